/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Multiboot v1 entry of the probe guest (QEMU -kernel): load a flat GDT,
 * clear .bss, set up the stack and call probe_main(magic, mbi).
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003	/* page-aligned modules, memory info */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	movw $0x10, %cx
	movw %cx, %ds
	movw %cx, %es
	movw %cx, %fs
	movw %cx, %gs
	movw %cx, %ss
	movl %eax, %esi			/* multiboot magic */
	movl %ebx, %ebp			/* multiboot info */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl
	movl $stack_top, %esp
	pushl %ebp
	pushl %esi
	call probe_main
2:	cli
	hlt
	jmp 2b

	.section .rodata
	.align 8
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: code, flat 4 GiB, accessed */
	.quad 0x00cf93000000ffff	/* 0x10: data, flat 4 GiB, accessed */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

	.section .note.GNU-stack, "", @progbits
