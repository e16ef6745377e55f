; counter: a deterministic sequence whose state (the step count n) lives in guest RAM.
; Runs at CPL3 with IOPL=3. RBP points at this vCPU's parameter page (layout in protocol.py, P_*):
;   +0x08 n        steps done so far (committed after each step)
;   +0x10 budget   steps the host still allows; at 0 the guest asks for more with OUT 0x11
;   +0x18 first    first page of this vCPU's working set
;   +0x20 npages   pages in the working set (>= 1)
;   +0x28 mask     report when (n & mask) == 0, mask = 2^shift - 1
;   +0x30 shift
;   +0x38 seed
; Step m computes v = splitmix64_mix(seed + m * 0x9e3779b97f4a7c15) and writes it at page
; first + (m mod npages), qword (m / npages) mod 512, then commits n = m + 1; when n is a multiple
; of 2^shift it reports n >> shift (low 32 bits) with OUT 0x10. The host checks that reports are
; consecutive and recomputes v for the last steps independently (protocol.py, check_vcpu).
; Position-independent; entered at offset 0.
bits 64
P_N      equ 0x08
P_BUDGET equ 0x10
P_FIRST  equ 0x18
P_NPAGES equ 0x20
P_MASK   equ 0x28
P_SHIFT  equ 0x30
P_SEED   equ 0x38
PORT_REPORT equ 0x10
PORT_BUDGET equ 0x11

step:
    cmp qword [rbp + P_BUDGET], 0
    jne .go
    out PORT_BUDGET, al
    jmp step
.go:
    dec qword [rbp + P_BUDGET]
    mov rcx, [rbp + P_N]
    ; v = mix(seed + m * gamma)
    mov rax, 0x9e3779b97f4a7c15
    imul rax, rcx
    add rax, [rbp + P_SEED]
    mov rdx, rax
    shr rdx, 30
    xor rax, rdx
    mov rdx, 0xbf58476d1ce4e5b9
    imul rax, rdx
    mov rdx, rax
    shr rdx, 27
    xor rax, rdx
    mov rdx, 0x94d049bb133111eb
    imul rax, rdx
    mov rdx, rax
    shr rdx, 31
    xor rax, rdx
    mov rsi, rax
    ; slot of step m
    mov rax, rcx
    xor edx, edx
    div qword [rbp + P_NPAGES]
    and eax, 511
    add rdx, [rbp + P_FIRST]
    shl rdx, 12
    mov [rdx + rax*8], rsi
    ; commit, then report
    inc rcx
    mov [rbp + P_N], rcx
    test rcx, [rbp + P_MASK]
    jnz step
    mov rax, rcx
    mov ecx, [rbp + P_SHIFT]
    shr rax, cl
    out PORT_REPORT, eax
    jmp step
