# Ferry built-in guest: the ring-0 kernel.
#
# On this host (KVM-PVM) every ring-0 instruction is emulated (~1.3 M instructions/s), so the kernel
# is as small as possible and written in assembly: PVH entry, page tables, GDT/TSS/IDT, starting the
# application processors, and one trap handler. The workload runs in ring 3 (natively) and enters
# ring 0 only through `ud2` "system calls":
#   rax=1 write(rdi=ptr, rsi=len)  -> one `rep outsb` to COM1 (a single exit)
#   rax=2 exit(rdi=code)           -> out to port 0x501 (Ferry's shutdown port, QEMU's isa-debug-exit)
# A machine check (#MC, vector 18) from ring 3 is a broken page the workload touched: the handler
# finds the bank holding the error, clears it, and resumes ring 3 at user_mce(cpu, gpa) on a
# fresh user stack, abandoning what the lane was doing (docs/poison.md).
# Any other exception prints `GUEST-FAULT vec=.. err=.. rip=.. cr2=..` and exits with code 3.
# Interrupts stay disabled everywhere: the workload polls the TSC for its heartbeat.

.set MAX_CPUS, 8
.set KSTACK_SIZE, 0x4000
.set USTACK_SIZE, 0x40000
.set TSS_STRIDE, 128
.set COM1, 0x3f8
.set EXIT_PORT, 0x501
.set TRAMPOLINE, 0x8000
.set LAPIC, 0xFEE00000
.set MSR_EFER, 0xC0000080
.set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01

# ---------------------------------------------------------------- PVH note
.section .note.Xen, "a"
.balign 4
.long 4                 # namesz
.long 4                 # descsz
.long 18                # XEN_ELFNOTE_PHYS32_ENTRY
.asciz "Xen"
.balign 4
.long pvh_start32
.balign 4

# ---------------------------------------------------------------- 32-bit entry
.section .text.boot, "ax"
.code32
.globl pvh_start32
pvh_start32:
    # PVH: protected mode, paging off, ebx = hvm_start_info.
    cli
    cld
    movl %ebx, %esi
    xorl %edi, %edi                 # edi = 0: bootstrap processor
    lgdtl gdt_ptr
    movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
common32:
    # esi = start_info (BSP) or 0, edi = 0 (BSP) / 1 (AP)
    movl $0x660, %eax               # PAE | MCE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax                # LME
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax          # clear EM
    orl $0x80000023, %eax           # PG | NE | MP | PE
    movl %eax, %cr0
    ljmpl $0x10, $start64

# ---------------------------------------------------------------- AP trampoline (copied to 0x8000)
.code16
tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_ptr - tramp_start + TRAMPOLINE)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(tramp32 - tramp_start + TRAMPOLINE)
.code32
tramp32:
    movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %esi, %esi
    movl $1, %edi
    movl $common32, %eax
    jmp *%eax
.balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:

# ---------------------------------------------------------------- 64-bit
.code64
start64:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    testl %edi, %edi
    jnz ap64
    movq %rsi, start_info_ptr(%rip)
    xorl %r15d, %r15d               # r15 = cpu index
    jmp cpu_setup
ap64:
    movl $1, %eax
    lock xaddl %eax, next_cpu(%rip)
    movl %eax, %r15d
    cmpl $MAX_CPUS, %r15d
    jae park

cpu_setup:
    # Kernel stack of this CPU.
    movq %r15, %rax
    shlq $14, %rax
    leaq kstacks+KSTACK_SIZE(%rip), %rsp
    addq %rax, %rsp
    # TSS: rsp0 = kernel stack, ist1 = IST stack, no I/O bitmap.
    movq %r15, %rbx
    shlq $7, %rbx
    leaq tss_array(%rip), %r8
    addq %rbx, %r8
    movq %rsp, 4(%r8)
    leaq iststacks+KSTACK_SIZE(%rip), %rax
    movq %r15, %rcx
    shlq $14, %rcx
    addq %rcx, %rax
    movq %rax, 36(%r8)
    movw $104, 102(%r8)
    # TSS descriptor at GDT offset 0x30 + 16 * cpu.
    leaq gdt(%rip), %r9
    movq %r15, %rcx
    shlq $4, %rcx
    leaq 0x30(%r9,%rcx), %r10
    movq %r8, %rax
    andq $0xFFFFFF, %rax
    shlq $16, %rax
    orq $103, %rax
    movabsq $0x0000890000000000, %rdx
    orq %rdx, %rax
    movq %r8, %rdx
    shrq $24, %rdx
    andq $0xFF, %rdx
    shlq $56, %rdx
    orq %rdx, %rax
    movq %rax, (%r10)
    movq %r8, %rdx
    shrq $32, %rdx
    movq %rdx, 8(%r10)
    movq %r15, %rax
    shlq $4, %rax
    addq $0x30, %rax
    ltrw %ax
    testl %r15d, %r15d
    jnz to_user

    # ---- bootstrap processor only
    call build_idt
    # kvmclock: the workload reads the TSC frequency from it.
    movl $MSR_KVM_SYSTEM_TIME_NEW, %ecx
    leaq pvclock(%rip), %rax
    orq $1, %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    # Start the application processors: trampoline, then INIT/SIPI/SIPI to all but self.
    leaq tramp_start(%rip), %rsi
    movl $TRAMPOLINE, %edi
    movl $(tramp_end - tramp_start), %ecx
    rep movsb
    movl $LAPIC, %ebx
    movl $0x1FF, 0xF0(%rbx)         # spurious vector register: APIC enabled
    movl $0x000C4500, 0x300(%rbx)   # INIT, all excluding self
    movl $0x000C4608, 0x300(%rbx)   # SIPI, vector 8 (0x8000)
    movl $0x000C4608, 0x300(%rbx)

to_user:
    lidt idt_ptr(%rip)
    # iretq into ring 3: user_main(cpu, start_info) on this CPU's user stack, IF=0, IOPL=0.
    movq %r15, %rax
    shlq $18, %rax
    leaq ustacks+USTACK_SIZE(%rip), %rcx
    addq %rax, %rcx
    subq $8, %rcx
    pushq $0x23
    pushq %rcx
    pushq $0x2
    pushq $0x2b
    leaq user_main(%rip), %rax
    pushq %rax
    movq %r15, %rdi
    movq start_info_ptr(%rip), %rsi
    xorl %eax, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    iretq

park:
    cli
    hlt
    jmp park

# Fill IDT vectors 0..31 from isr_table; NMI, #DF and #MC run on IST1.
build_idt:
    leaq idt(%rip), %rdi
    leaq isr_table(%rip), %rsi
    xorl %ecx, %ecx
1:
    movq (%rsi,%rcx,8), %rax        # handler address
    movq %rax, %rdx
    andq $0xFFFF, %rdx              # offset 15:0
    orq $0x100000, %rdx             # selector 0x10 << 16
    movq %rax, %r8
    shrq $16, %r8
    andq $0xFFFF, %r8
    shlq $48, %r8
    orq %r8, %rdx                   # offset 31:16
    movabsq $0x00008E0000000000, %r8
    orq %r8, %rdx                   # present, DPL 0, interrupt gate
    cmpl $2, %ecx
    je 2f
    cmpl $8, %ecx
    je 2f
    cmpl $18, %ecx
    jne 3f
2:
    movabsq $0x0000000100000000, %r8
    orq %r8, %rdx                   # IST 1
3:
    movq %rcx, %r9
    shlq $4, %r9
    movq %rdx, (%rdi,%r9)
    shrq $32, %rax
    movq %rax, 8(%rdi,%r9)
    incl %ecx
    cmpl $32, %ecx
    jne 1b
    ret

# ---------------------------------------------------------------- traps
.macro ISR_NOERR n
isr_\n:
    pushq $0
    pushq $\n
    jmp isr_common
.endm
.macro ISR_ERR n
isr_\n:
    pushq $\n
    jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR 21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR 29
ISR_ERR 30
ISR_NOERR 31

# #UD from ring 3 is the system call.
isr_6:
    testb $3, 8(%rsp)
    jz 1f
    cmpq $1, %rax
    je sys_write
    cmpq $2, %rax
    je sys_exit
1:
    pushq $0
    pushq $6
    jmp isr_common

sys_write:
    pushq %rcx
    pushq %rdx
    pushq %rsi
    movq %rsi, %rcx
    movq %rdi, %rsi
    movw $COM1, %dx
    rep outsb
    popq %rsi
    popq %rdx
    popq %rcx
    addq $2, (%rsp)                 # skip the ud2
    iretq

# #MC (IST1, no error code). Stack: rip, cs, rflags, rsp, ss.
isr_18:
    testb $3, 8(%rsp)
    jz 9f
    # This CPU's index from its IST stack: (rsp - iststacks) / KSTACK_SIZE.
    leaq iststacks(%rip), %rax
    movq %rsp, %r15
    subq %rax, %r15
    shrq $14, %r15
    # The bank with a valid error, from the last: MCi_STATUS = 0x401 + 4i, MCi_ADDR = 0x402 + 4i.
    movl $0x179, %ecx               # MCG_CAP: bank count in bits 7:0
    rdmsr
    movzbl %al, %r8d
    xorl %r9d, %r9d                 # gpa (0 if no bank says)
1:
    testl %r8d, %r8d
    jz 3f
    decl %r8d
    leal 0x401(,%r8,4), %ecx
    rdmsr
    btl $31, %edx                   # MCi_STATUS.VAL
    jnc 1b
    incl %ecx
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movq %rax, %r9
    decl %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr                           # clear MCi_STATUS
3:
    movl $0x17a, %ecx               # MCG_STATUS: MCIP off, so a later #MC is not a shutdown
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    # Resume ring 3 at user_mce(cpu, gpa) on this CPU's fresh user stack.
    leaq user_mce(%rip), %rax
    movq %rax, 0(%rsp)
    movq %r15, %rax
    shlq $18, %rax
    leaq ustacks+USTACK_SIZE(%rip), %rcx
    addq %rax, %rcx
    subq $8, %rcx
    movq %rcx, 24(%rsp)
    movq %r15, %rdi
    movq %r9, %rsi
    iretq
9:
    pushq $0
    pushq $18
    jmp isr_common

sys_exit:
    movw $EXIT_PORT, %dx
    movl %edi, %eax
    outb %al, %dx
    jmp halt_forever

# Stack: vec, err, rip, cs, rflags, rsp, ss.
isr_common:
    leaq fault_buf(%rip), %rdi
    leaq msg_vec(%rip), %rsi
    movl $(msg_err - msg_vec), %ecx
    rep movsb
    movq (%rsp), %rax
    movl $2, %ecx
    call put_hex
    leaq msg_err(%rip), %rsi
    movl $(msg_rip - msg_err), %ecx
    rep movsb
    movq 8(%rsp), %rax
    movl $8, %ecx
    call put_hex
    leaq msg_rip(%rip), %rsi
    movl $(msg_cr2 - msg_rip), %ecx
    rep movsb
    movq 16(%rsp), %rax
    movl $16, %ecx
    call put_hex
    leaq msg_cr2(%rip), %rsi
    movl $(msg_end - msg_cr2), %ecx
    rep movsb
    movq %cr2, %rax
    movl $16, %ecx
    call put_hex
    movb $10, (%rdi)
    incq %rdi
    leaq fault_buf(%rip), %rsi
    movq %rdi, %rcx
    subq %rsi, %rcx
    movw $COM1, %dx
    rep outsb
    movl $3, %eax
    movw $EXIT_PORT, %dx
    outb %al, %dx
halt_forever:
    cli
    hlt
    jmp halt_forever

# rax = value, ecx = hex digits, rdi = destination (advanced). Clobbers rdx, r9, r10.
put_hex:
    leaq hexdigits(%rip), %r9
1:
    testl %ecx, %ecx
    jz 2f
    decl %ecx
    movl %ecx, %r10d
    movq %rax, %rdx
    shll $2, %ecx
    shrq %cl, %rdx
    movl %r10d, %ecx
    andl $15, %edx
    movb (%r9,%rdx), %dl
    movb %dl, (%rdi)
    incq %rdi
    jmp 1b
2:
    ret

# ---------------------------------------------------------------- read-only data
.section .rodata
.balign 8
isr_table:
    .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7
    .quad isr_8, isr_9, isr_10, isr_11, isr_12, isr_13, isr_14, isr_15
    .quad isr_16, isr_17, isr_18, isr_19, isr_20, isr_21, isr_22, isr_23
    .quad isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30, isr_31
hexdigits:
    .ascii "0123456789abcdef"
msg_vec:
    .ascii "GUEST-FAULT vec="
msg_err:
    .ascii " err="
msg_rip:
    .ascii " rip="
msg_cr2:
    .ascii " cr2="
msg_end:

# ---------------------------------------------------------------- data
.section .data.pagetables, "aw"
.balign 4096
# Identity map of the low 4 GiB with 2 MiB pages, user-accessible (the workload reads
# hvm_start_info and kvmclock directly).
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:
.set i, 0
.rept 2048
    .quad (i << 21) | 0x87
.set i, i + 1
.endr

.section .data, "aw"
.balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        # 0x08 code32
    .quad 0x00af9a000000ffff        # 0x10 kernel code64
    .quad 0x00cf92000000ffff        # 0x18 kernel data
    .quad 0x00cff2000000ffff        # 0x20 user data (0x23)
    .quad 0x00affa000000ffff        # 0x28 user code64 (0x2b)
    .fill MAX_CPUS * 2, 8, 0        # 0x30 + 16*cpu: TSS descriptors
gdt_end:
.balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 8
idt_ptr:
    .word 32 * 16 - 1
    .quad idt
.balign 4
.globl next_cpu
next_cpu:
    .long 1
.balign 8
.globl start_info_ptr
start_info_ptr:
    .quad 0

.section .bss
.balign 4096
.globl pvclock
pvclock:
    .skip 4096
idt:
    .skip 32 * 16
.balign 64
tss_array:
    .skip MAX_CPUS * TSS_STRIDE
fault_buf:
    .skip 256
.balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
iststacks:
    .skip MAX_CPUS * KSTACK_SIZE
ustacks:
    .skip MAX_CPUS * USTACK_SIZE
