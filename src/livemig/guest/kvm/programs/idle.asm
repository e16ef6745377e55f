; idle: halt forever. Runs at CPL0 (HLT is privileged); with no in-kernel irqchip every HLT is a
; KVM_EXIT_HLT to userspace, where the vCPU thread sleeps until it is paused, so an idle guest uses
; no CPU. Position-independent; entered at offset 0.
bits 64
top:
    hlt
    jmp top
