/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Firmware entry of the probe guest (QEMU -bios): the image is the whole
 * 64 KiB BIOS ROM, so the VM runs no SeaBIOS at all.  From the reset
 * vector, switch to flat 32-bit protected mode, copy .data to RAM, clear
 * .bss and call probe_main(0, 0).  Running no BIOS matters where guest
 * ring-0 code is emulated: SeaBIOS alone takes seconds there.
 */
	.section .text.bios16, "ax"
	.code16
	.globl start16
start16:
	cli
	cld
	lgdtl %cs:bios_gdt_desc16	/* offset in the ROM segment */
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x08, $start32

	.text
	.code32
start32:
	movw $0x10, %cx
	movw %cx, %ds
	movw %cx, %es
	movw %cx, %fs
	movw %cx, %gs
	movw %cx, %ss
	movl $__data_lma, %esi
	movl $__data_start, %edi
	movl $__data_end, %ecx
	subl %edi, %ecx
	rep movsb
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl
	movl $stack_top, %esp
	pushl $0
	pushl $0
	call probe_main
1:	cli
	hlt
	jmp 1b

	.section .rodata
	.align 8
/* Accessed bits preset: the CPU must not write to a GDT in ROM. */
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: code, flat 4 GiB, accessed */
	.quad 0x00cf93000000ffff	/* 0x10: data, flat 4 GiB, accessed */
	.globl bios_gdt_desc
bios_gdt_desc:
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

/* The CPU starts at 0xfffffff0 in real mode with CS base 0xffff0000. */
	.section .reset, "ax"
	.code16
	jmp start16

	.section .note.GNU-stack, "", @progbits
