/*
 * linux64-selftest builds only. Entered from the PVH path in long mode on our
 * own tables; recreates what a VMM leaves for a 64-bit Linux boot (its own
 * identity map of the first 1 GiB, non-user, 2 MiB pages; a boot_params zero
 * page built from hvm_start_info; rsi pointing at it) and enters the ELF entry
 * point, so the linux64 path can be run under a PVH-only loader.
 * No curly braces: this is a Rust global_asm! template.
 */
.section .text, "ax"
.code64
.globl linux64_selftest
linux64_selftest:
    /* Scratch area right after the stacks: PML4, PDPT, PD, zero page. */
    mov $__free_mem, %r8d
    mov %r8, %rdi
    mov $(4 * 4096 / 8), %ecx
    xor %eax, %eax
    rep stosq
    lea 0x1003(%r8), %rax
    mov %rax, 0(%r8)
    lea 0x2003(%r8), %rax
    mov %rax, 0x1000(%r8)
    lea 0x2000(%r8), %rdi
    mov $0x83, %eax
    mov $512, %ecx
1:  mov %rax, (%rdi)
    add $0x200000, %rax
    add $8, %rdi
    dec %ecx
    jnz 1b

    mov boot_info_ptr(%rip), %rsi
    lea 0x3000(%r8), %rdi
    mov 24(%rsi), %rax              /* cmdline_paddr */
    mov %eax, 0x228(%rdi)
    shr $32, %rax
    mov %eax, 0xc8(%rdi)
    mov 32(%rsi), %rax              /* rsdp_paddr */
    mov %rax, 0x70(%rdi)
    cmpl $1, 4(%rsi)
    jb 3f
    mov 48(%rsi), %ecx
    cmp $128, %ecx
    jbe 2f
    mov $128, %ecx
2:  mov %cl, 0x1e8(%rdi)
    mov 40(%rsi), %rsi
    lea 0x2d0(%rdi), %rdi
    test %ecx, %ecx
    jz 3f
4:  mov 0(%rsi), %rax
    mov %rax, 0(%rdi)
    mov 8(%rsi), %rax
    mov %rax, 8(%rdi)
    mov 16(%rsi), %eax
    mov %eax, 16(%rdi)
    add $24, %rsi
    add $20, %rdi
    dec %ecx
    jnz 4b
3:
    mov %r8, %cr3
    lea 0x3000(%r8), %rsi
    jmp linux64_entry
