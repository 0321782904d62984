/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The pieces of the probe guest that must be assembly: interrupt entry
 * points, idling, the instructions used to provoke a KVM emulation
 * failure, and the stack.
 */
	.text
	.code32

/*
 * Interrupts are only ever taken inside idle_hlt.  The handlers return
 * with "ret $8" (dropping CS and EFLAGS, so IF stays clear) instead of
 * IRET: KVM's instruction emulator implements IRET for real mode only,
 * and emulated ring-0 code would otherwise stop with an emulation error.
 */
	.globl irq0_entry
irq0_entry:
	pushl %eax
	incl probe_ticks
	movb $0x20, %al
	outb %al, $0x20
	popl %eax
	ret $8

/* Any other interrupt line: acknowledge both PICs. */
	.globl irq_other_entry
irq_other_entry:
	pushl %eax
	movb $0x20, %al
	outb %al, $0xa0
	outb %al, $0x20
	popl %eax
	ret $8

/* CPU exceptions are fatal: report and halt. */
	.globl exc_entry
exc_entry:
	cli
	call probe_exception
3:	hlt
	jmp 3b

/* Sleep until the next interrupt; sti's shadow makes "sti; hlt" atomic. */
	.globl idle_hlt
idle_hlt:
	sti
	hlt
	cli
	ret

/*
 * A protected-mode IRET to the next instruction: KVM's emulator only
 * implements real-mode IRET, so where guest ring-0 code is emulated
 * (e.g. the kvm_pvm backend) this is an emulation failure.  Real CPUs
 * just continue.
 */
	.globl emu_iret
emu_iret:
	pushfl
	pushl %cs
	pushl $1f
	iret
1:	ret

/*
 * ENTER with a non-zero nesting level: KVM's x86 emulator refuses it
 * (X86EMUL_UNHANDLEABLE), which ends in KVM_INTERNAL_ERROR_EMULATION
 * wherever guest ring-0 code is emulated.  Real CPUs just run it.
 */
	.globl emu_enter_nested
emu_enter_nested:
	pushl %ebp
	movl %esp, %ebp
	enter $0, $1
	leave
	popl %ebp
	ret

/*
 * Jump to an MMIO (or unbacked) address: on hardware KVM the code fetch
 * exits to the emulator, which cannot fetch from MMIO and reports an
 * emulation failure.  Does not return.
 */
	.globl emu_jump
emu_jump:
	movl 4(%esp), %eax
	jmp *%eax

	.section .note.GNU-stack, "", @progbits

	.bss
	.align 16
	.space 16384
	.globl stack_top
stack_top:
