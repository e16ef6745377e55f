; dirty: write one qword into a page of the working set per step, pages in round-robin order.
; Runs at CPL3 with IOPL=3. RBP points at this vCPU's parameter page (layout in protocol.py, P_*):
;   +0x08 n        steps done so far (the workload's state, committed after each step)
;   +0x10 budget   steps the host still allows; at 0 the guest asks for more with OUT 0x11
;   +0x18 first    first page (index in guest RAM) of this vCPU's working set
;   +0x20 npages   pages in this vCPU's working set (>= 1)
; Step m writes m at page first + (m mod npages), qword (m / npages) mod 512.
; The host paces the guest by the budget it grants on each OUT 0x11 (see protocol.py, next_grant), and
; can change the rate live. Position-independent; entered at offset 0.
bits 64
P_N      equ 0x08
P_BUDGET equ 0x10
P_FIRST  equ 0x18
P_NPAGES equ 0x20
PORT_BUDGET equ 0x11

step:
    cmp qword [rbp + P_BUDGET], 0
    jne .go
    out PORT_BUDGET, al
    jmp step
.go:
    dec qword [rbp + P_BUDGET]
    mov rcx, [rbp + P_N]
    mov rax, rcx
    xor edx, edx
    div qword [rbp + P_NPAGES]
    and eax, 511
    add rdx, [rbp + P_FIRST]
    shl rdx, 12
    mov [rdx + rax*8], rcx
    inc rcx
    mov [rbp + P_N], rcx
    jmp step
