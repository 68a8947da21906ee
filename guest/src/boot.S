/*
 * CPL0 part of the test guest. Under nested KVM of the emulating kind every
 * CPL0 instruction is interpreted (slow, and no SSE, int3, xsave, popcnt...),
 * so this stays a few hundred plain integer instructions: set up long mode,
 * GDT/TSS/IDT, drop to CPL3, and serve the few privileged operations the
 * CPL3 code asks for through `ud2` (#UD is the system call gate because
 * syscall and int 0x80 do not work there).
 *
 * No curly braces in this file: it is a Rust global_asm! template.
 */

.set MAX_CPUS, 64
.set KSTACK_SHIFT, 12
.set USTACK_SHIFT, 16

.set SEL_KCODE64, 0x08
.set SEL_KDATA, 0x10
.set SEL_KCODE32, 0x18
.set SEL_UDATA, 0x20
.set SEL_UCODE64, 0x28
.set SEL_TSS0, 0x30

.set COM1, 0x3f8
.set CR0_VALUE, 0x80010033      /* PG WP NE ET MP PE; EM, TS, CD, NW clear */
.set CR4_BITS, 0x620            /* PAE OSFXSR OSXMMEXCPT: CPL3 may use SSE */
.set PTE_USER_RW, 0x7           /* P RW US at every level: CPL3 sees all */
.set PDE_2M_USER_RW, 0x87       /* + PS */
.set MSR_EFER, 0xc0000080
.set EFER_LME, 0x100

/* ------------------------------------------------------------------------ */
.section .note.tandem, "a"
.balign 4
    .long 4                     /* namesz */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

/* ------------------------------------------------------------------------ */
.section .text.boot, "ax"

.code32
.globl pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, %esi
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov %esi, boot_info_ptr
    movl $1, boot_entry_kind
    mov $(__kstacks + (1 << KSTACK_SHIFT)), %esp

    /* 2048 x 2 MiB user pages = first 4 GiB; unrolled by 4 to cut emulated
       loop overhead. */
    mov $__pagedirs, %edi
    mov $PDE_2M_USER_RW, %eax
    xor %edx, %edx
    mov $512, %ecx
1:  mov %eax, 0(%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    mov %eax, 8(%edi)
    mov %edx, 12(%edi)
    add $0x200000, %eax
    mov %eax, 16(%edi)
    mov %edx, 20(%edi)
    add $0x200000, %eax
    mov %eax, 24(%edi)
    mov %edx, 28(%edi)
    add $0x200000, %eax
    add $32, %edi
    dec %ecx
    jnz 1b
    movl $(__pagedirs + 0x0000 + PTE_USER_RW), pdpt + 0
    movl $(__pagedirs + 0x1000 + PTE_USER_RW), pdpt + 8
    movl $(__pagedirs + 0x2000 + PTE_USER_RW), pdpt + 16
    movl $(__pagedirs + 0x3000 + PTE_USER_RW), pdpt + 24
    movl $(pdpt + PTE_USER_RW), pml4

    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $CR0_VALUE, %eax
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $SEL_KCODE64, $bsp64

.code64
/* ELF e_entry: Linux 64-bit boot protocol, rsi = boot_params. */
.globl linux64_entry
linux64_entry:
    cli
    cld
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq
    mov %rsi, boot_info_ptr(%rip)
    movl $2, boot_entry_kind(%rip)
    mov $(__kstacks + (1 << KSTACK_SHIFT)), %esp

    /* Same tables as the PVH path; the loader's map stays live until cr3. */
    mov $__pagedirs, %edi
    mov $PDE_2M_USER_RW, %eax
    mov $512, %ecx
1:  mov %rax, 0(%rdi)
    add $0x200000, %eax
    mov %rax, 8(%rdi)
    add $0x200000, %eax
    mov %rax, 16(%rdi)
    add $0x200000, %eax
    mov %rax, 24(%rdi)
    add $0x200000, %rax
    add $32, %rdi
    dec %ecx
    jnz 1b
    movq $(__pagedirs + 0x0000 + PTE_USER_RW), pdpt + 0(%rip)
    movq $(__pagedirs + 0x1000 + PTE_USER_RW), pdpt + 8(%rip)
    movq $(__pagedirs + 0x2000 + PTE_USER_RW), pdpt + 16(%rip)
    movq $(__pagedirs + 0x3000 + PTE_USER_RW), pdpt + 24(%rip)
    movq $(pdpt + PTE_USER_RW), pml4(%rip)

    lgdt gdt_ptr(%rip)
    /* Exactly our bits: a loader's SMEP/SMAP would trip over CPL0 code and
       syscall buffers on user pages. PAE stays set, as long mode needs. */
    mov $CR4_BITS, %eax
    mov %rax, %cr4
    mov $pml4, %eax
    mov %rax, %cr3
    mov $CR0_VALUE, %eax
    mov %rax, %cr0
    pushq $SEL_KCODE64
    pushq $bsp64
    lretq

/* BSP, both entries, long mode on our tables and GDT. */
bsp64:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs

    /* Test build only: the weak hook fakes a 64-bit Linux boot. */
    mov $linux64_selftest, %eax
    test %eax, %eax
    jz 2f
    cmpl $1, boot_entry_kind(%rip)
    jne 2f
    jmp *%rax
2:
    /* IDT: vectors 0-31 get their own stub (the fault report names the
       vector), all others share the interrupt stub. */
    mov $idt, %edi
    mov $exc_stubs, %esi
    mov $32, %ecx
1:  mov %esi, %eax
    and $0xffff, %eax
    or $(SEL_KCODE64 << 16), %eax
    mov %eax, 0(%rdi)
    mov %esi, %eax
    and $0xffff0000, %eax
    or $0x8e00, %eax            /* present, DPL0, 64-bit interrupt gate */
    mov %eax, 4(%rdi)
    add $16, %rdi
    add $16, %esi
    dec %ecx
    jnz 1b
    mov $irq_stub, %esi
    mov %esi, %eax
    and $0xffff, %eax
    or $(SEL_KCODE64 << 16), %eax
    and $0xffff0000, %esi
    or $0x8e00, %esi
    mov $224, %ecx
1:  mov %eax, 0(%rdi)
    mov %esi, 4(%rdi)
    add $16, %rdi
    dec %ecx
    jnz 1b

    xor %ebx, %ebx
    mov $user_main, %r12d
    jmp cpu_common

/* Per-CPU: kernel stack, TSS (RSP0), TR, IDT, then iretq to CPL3.
   ebx = cpu index, r12 = CPL3 entry. */
cpu_common:
    mov %ebx, %eax
    inc %eax
    shl $KSTACK_SHIFT, %eax
    add $__kstacks, %eax
    mov %rax, %rsp

    mov %ebx, %edi
    shl $7, %edi
    add $tss_array, %edi
    mov %rsp, 4(%rdi)           /* rsp0 */
    movw $104, 102(%rdi)        /* no I/O bitmap */

    /* 64-bit available TSS descriptor, limit 103, base < 4 GiB. */
    mov %edi, %eax
    mov %eax, %edx
    and $0xffffff, %edx
    shl $16, %rdx
    or $0x67, %rdx
    movabs $0x0000890000000000, %rcx
    or %rcx, %rdx
    shr $24, %eax
    shl $56, %rax
    or %rax, %rdx
    mov %ebx, %ecx
    shl $4, %ecx
    mov %rdx, gdt_tss(%rcx)
    movq $0, gdt_tss + 8(%rcx)
    add $SEL_TSS0, %ecx
    ltr %cx

    lidt idt_ptr(%rip)

    mov %ebx, %eax
    inc %eax
    shl $USTACK_SHIFT, %eax
    add $__ustacks, %eax
    sub $8, %rax                /* as if called: rsp+8 16-byte aligned */
    pushq $(SEL_UDATA | 3)
    push %rax
    pushq $0x2                  /* IF=0, IOPL=0 */
    pushq $(SEL_UCODE64 | 3)
    push %r12
    mov %ebx, %edi
    iretq

/* ------------------------------------------------------------------------ */
/* AP start: the real-mode part is copied to a page below 1 MiB by the BSP. */
.code16
.balign 16
.globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_KCODE32, $ap32
.balign 8
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
.globl ap_tramp_end
ap_tramp_end:

.code32
ap32:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $CR0_VALUE, %eax
    mov %eax, %cr0
    ljmp $SEL_KCODE64, $ap64

.code64
ap64:
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %ebx
    lock xadd %ebx, ap_last_index(%rip)
    inc %ebx
    cmp $MAX_CPUS, %ebx
    jae park
    mov $ap_main, %r12d
    jmp cpu_common

/* ------------------------------------------------------------------------ */
/* Exceptions. Every stub is 16 bytes so the IDT loop can step through them. */
.macro EXC vec, has_err
    .balign 16
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
.endm

.balign 16
exc_stubs:
    EXC 0, 0
    EXC 1, 0
    EXC 2, 0
    EXC 3, 0
    EXC 4, 0
    EXC 5, 0
    .balign 16
    jmp syscall_entry           /* 6: #UD is the system call gate */
    EXC 7, 0
    EXC 8, 1
    EXC 9, 0
    EXC 10, 1
    EXC 11, 1
    EXC 12, 1
    EXC 13, 1
    EXC 14, 1
    EXC 15, 0
    EXC 16, 0
    EXC 17, 1
    EXC 18, 0
    EXC 19, 0
    EXC 20, 0
    EXC 21, 1
    EXC 22, 0
    EXC 23, 0
    EXC 24, 0
    EXC 25, 0
    EXC 26, 0
    EXC 27, 0
    EXC 28, 0
    EXC 29, 1
    EXC 30, 1
    EXC 31, 0

/* Interrupts (a LAPIC timer later): acknowledge and resume. */
.balign 16
irq_stub:
    push %rax
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/* Report and power off; never returns. Stack: vec, err, rip, cs, ... */
exc_common:
    cld
    mov %rsp, %rbp
    mov $msg_fault, %esi
    mov $(msg_fault_end - msg_fault), %ecx
    call kputs
    mov 0(%rbp), %rax
    call kput_dec
    mov $msg_err, %esi
    mov $5, %ecx
    call kputs
    mov 8(%rbp), %rax
    call kput_hex
    mov $msg_rip, %esi
    mov $5, %ecx
    call kputs
    mov 16(%rbp), %rax
    call kput_hex
    mov $msg_cr2, %esi
    mov $5, %ecx
    call kputs
    mov %cr2, %rax
    call kput_hex
    mov $msg_nl, %esi
    mov $1, %ecx
    call kputs
    jmp do_shutdown

/* rsi = bytes, rcx = count */
kputs:
    mov $COM1, %edx
    rep outsb
    ret

/* rax = value, printed in decimal */
kput_dec:
    mov $10, %ecx
    xor %r8d, %r8d
1:  xor %edx, %edx
    div %rcx
    add $48, %edx
    push %rdx
    inc %r8d
    test %rax, %rax
    jnz 1b
    mov $COM1, %edx
1:  pop %rax
    out %al, %dx
    dec %r8d
    jnz 1b
    ret

/* rax = value, printed as 0x-prefixed hex without leading zeros */
kput_hex:
    mov %rax, %rsi
    mov $COM1, %edx
    mov $48, %al
    out %al, %dx
    mov $120, %al
    out %al, %dx
    mov $60, %ecx
    xor %edi, %edi
1:  mov %rsi, %rax
    shr %cl, %rax
    and $15, %eax
    or %eax, %edi
    jz 3f
    cmp $10, %eax
    jb 2f
    add $39, %eax
2:  add $48, %eax
    out %al, %dx
3:  sub $4, %ecx
    jns 1b
    test %edi, %edi
    jnz 4f
    mov $48, %al
    out %al, %dx
4:  ret

/* ------------------------------------------------------------------------ */
/* System calls: ud2 at CPL3, rax = number, rdi/rsi/rdx = arguments, result in
   rax; rcx, rdx, rsi, rdi are clobbered. Stack: rip, cs, rflags, rsp, ss. */
syscall_entry:
    testb $3, 8(%rsp)
    jz 1f
    mov (%rsp), %rcx
    cmpw $0x0b0f, (%rcx)
    jne 1f
    cmp $SYS_COUNT, %rax
    jae 2f
    jmp *sys_table(,%rax,8)
1:  pushq $0
    pushq $6
    jmp exc_common
2:  mov $-1, %rax
sys_done:
    addq $2, (%rsp)
    iretq

sys_shutdown:
do_shutdown:
    mov $0x600, %edx
    mov $0x34, %eax             /* ACPI S5: SLP_TYP=5, SLP_EN */
    out %al, %dx
    mov $0xf4, %edx
    xor %eax, %eax              /* isa-debug-exit, if present */
    out %al, %dx
park:
    cli
1:  hlt
    jmp 1b

sys_reset:
    mov $0xfe, %al
    out %al, $0x64              /* i8042 pulse reset line */
    lidt null_idt_ptr(%rip)     /* else triple fault */
    ud2

sys_park:
    jmp park

sys_outs:
    cld
    mov %rdx, %rcx
    mov %edi, %edx
    rep outsb
    jmp sys_done

sys_outb:
    mov %edi, %edx
    mov %esi, %eax
    out %al, %dx
    jmp sys_done

sys_inb:
    mov %edi, %edx
    xor %eax, %eax
    in %dx, %al
    jmp sys_done

sys_outw:
    mov %edi, %edx
    mov %esi, %eax
    out %ax, %dx
    jmp sys_done

sys_inw:
    mov %edi, %edx
    xor %eax, %eax
    in %dx, %ax
    jmp sys_done

sys_outl:
    mov %edi, %edx
    mov %esi, %eax
    out %eax, %dx
    jmp sys_done

sys_inl:
    mov %edi, %edx
    in %dx, %eax
    jmp sys_done

sys_wrmsr:
    mov %edi, %ecx
    mov %rsi, %rax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    xor %eax, %eax
    jmp sys_done

sys_rdmsr:
    mov %edi, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    jmp sys_done

/* Sleep until an interrupt arrives (with a timer armed by the caller). */
sys_hlt:
    sti
    hlt
    cli
    xor %eax, %eax
    jmp sys_done

/* ------------------------------------------------------------------------ */
.section .rodata
.balign 8
sys_table:
    .quad sys_shutdown          /* 0 */
    .quad sys_reset             /* 1 */
    .quad sys_park              /* 2 */
    .quad sys_outs              /* 3 */
    .quad sys_outb              /* 4 */
    .quad sys_inb               /* 5 */
    .quad sys_outw              /* 6 */
    .quad sys_inw               /* 7 */
    .quad sys_outl              /* 8 */
    .quad sys_inl               /* 9 */
    .quad sys_wrmsr             /* 10 */
    .quad sys_rdmsr             /* 11 */
    .quad sys_hlt               /* 12 */
sys_table_end:
.set SYS_COUNT, (sys_table_end - sys_table) / 8

msg_fault:
    .ascii "TANDEM-GUEST FAULT vec="
msg_fault_end:
msg_err:
    .ascii " err="
msg_rip:
    .ascii " rip="
msg_cr2:
    .ascii " cr2="
msg_nl:
    .ascii "\n"

.balign 8
null_idt_ptr:
    .word 0
    .quad 0

/* ------------------------------------------------------------------------ */
.section .data
.balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff    /* 0x18 kernel code 32 (AP start) */
    .quad 0x00cff2000000ffff    /* 0x20 user data */
    .quad 0x00affa000000ffff    /* 0x28 user code 64 */
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0    /* 0x30 + 16 * cpu: per-CPU TSS */
gdt_end:

.balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .word 0, 0, 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt


.section .bss
.balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
idt:
    .skip 256 * 16
tss_array:
    .skip MAX_CPUS * 128
.balign 8
.globl boot_info_ptr
boot_info_ptr:
    .skip 8
.globl boot_entry_kind
boot_entry_kind:
    .skip 4
.globl ap_last_index
ap_last_index:
    .skip 4
