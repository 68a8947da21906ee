//! The C memory functions the compiler expects. Written as string
//! instructions in assembly so the compiler cannot turn their loops back into
//! calls to themselves; they only ever run at CPL3, where `rep movsb` is fast.

use core::arch::global_asm;

global_asm!(
    r#"
.section .text.memfns, "ax"
.globl memcpy
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

.globl memmove
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 2f
    lea r8, [rsi + rdx]
    cmp rdi, r8
    jae 2f
    lea rdi, [rdi + rdx - 1]
    lea rsi, [rsi + rdx - 1]
    std
    rep movsb
    cld
    ret
2:
    rep movsb
    ret

.globl memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

.globl memcmp
.globl bcmp
memcmp:
bcmp:
    xor eax, eax
    mov rcx, rdx
    test rcx, rcx
    jz 3f
    repe cmpsb
    je 3f
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub eax, ecx
3:
    ret

// Unoptimized builds keep references to it from precompiled unwind tables;
// with panic=abort it is never called.
.globl rust_eh_personality
rust_eh_personality:
    ud2
"#
);
