/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Time and idling.  Time is the TSC; its rate comes from KVM's pvclock
 * where available (exact, and PIT polling is unreliable when every port
 * access of an emulated guest competes for a loaded host), else from
 * PIT channel 2.
 * Idling either spins or, with interrupts, halts until the next 100 Hz
 * PIT tick so an idle probe costs the host almost nothing.
 */
#include "probe.h"

#define PIT_HZ 1193182u

struct idt_gate {
	u16 off_lo;
	u16 sel;
	u8 zero;
	u8 type;
	u16 off_hi;
} __attribute__((packed));

volatile u32 probe_ticks;
static struct idt_gate idt[64];
static u64 tsc0;
static u32 tsc_khz = 1000000;	/* replaced by the calibration */
static int irq_mode;

static inline u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

struct pvclock {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags;
	u8 pad[2];
} __attribute__((packed));

static struct pvclock pvclock __attribute__((aligned(64)));

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void wrmsr(u32 msr, u64 v)
{
	__asm__ __volatile__("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

/* TSC kHz from KVM's pvclock (kvmclock) scale factor; 0 if not on KVM. */
static u32 kvmclock_tsc_khz(void)
{
	u32 a, b, c, d;
	u64 khz;

	cpuid(0x40000000, &a, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d)	/* "KVMKVMKVM" */
		return 0;
	cpuid(0x40000001, &a, &b, &c, &d);
	if (!(a & (1u << 3)))		/* KVM_FEATURE_CLOCKSOURCE2 */
		return 0;
	wrmsr(0x4b564d01, (u32)&pvclock | 1);
	for (int i = 0; i < 1000 && (!pvclock.version || (pvclock.version & 1)); i++)
		barrier();
	wrmsr(0x4b564d01, 0);	/* stop KVM from writing guest memory */
	if (!pvclock.tsc_to_system_mul)
		return 0;
	khz = (1000000ull << 32) / pvclock.tsc_to_system_mul;
	if (pvclock.tsc_shift >= 0)
		khz >>= pvclock.tsc_shift;
	else
		khz <<= -pvclock.tsc_shift;
	return (u32)khz;
}

static void calibrate_tsc(void)
{
	u32 count = PIT_HZ / 50;	/* 20 ms */
	u64 t0, t1;
	u32 i;

	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
	outb(0x43, 0xb0);		/* channel 2, lo/hi, mode 0 */
	outb(0x42, (u8)count);
	outb(0x42, (u8)(count >> 8));
	t0 = rdtsc();
	for (i = 0; i < 10000000 && !(inb(0x61) & 0x20); i++)
		;
	t1 = rdtsc();
	if (i < 10000000 && t1 > t0)
		tsc_khz = (u32)((t1 - t0) / 20);
}

static void set_gate(int vec, void (*fn)(void))
{
	u32 a = (u32)fn;

	idt[vec].off_lo = (u16)a;
	idt[vec].sel = 0x08;
	idt[vec].zero = 0;
	idt[vec].type = 0x8e;	/* present, ring 0, 32-bit interrupt gate */
	idt[vec].off_hi = (u16)(a >> 16);
}

/*
 * Exceptions always get a handler (report and halt rather than triple
 * fault); the PIT interrupt is only unmasked for idling with hlt.
 */
static void irq_init(int use_irq)
{
	struct {
		u16 limit;
		u32 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u32)idt };
	u32 div = PIT_HZ / 100;

	for (int v = 0; v < 64; v++)
		set_gate(v, v < 32 ? exc_entry : irq_other_entry);
	set_gate(32, irq0_entry);
	__asm__ __volatile__("lidt %0" : : "m"(idtr));
	/* Remap the PICs to vectors 32..47, everything masked. */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 32);
	outb(0xa1, 40);
	outb(0x21, 4);
	outb(0xa1, 2);
	outb(0x21, 1);
	outb(0xa1, 1);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	if (!use_irq)
		return;
	/*
	 * Let the PIC through the local APIC (LINT0 = ExtINT), as a BIOS
	 * does; without a BIOS (-bios) LINT0 is still masked from reset.
	 */
	*(volatile u32 *)0xfee000f0 = 0x1ff;	/* spurious vector, APIC on */
	*(volatile u32 *)0xfee00350 = 0x700;	/* LINT0: ExtINT */
	outb(0x43, 0x34);	/* channel 0, lo/hi, rate generator */
	outb(0x40, (u8)div);
	outb(0x40, (u8)(div >> 8));
	outb(0x21, 0xfe);	/* unmask IRQ0 */
}

void time_init(int use_irq)
{
	u32 khz = kvmclock_tsc_khz();

	if (khz)
		tsc_khz = khz;
	else
		calibrate_tsc();
	tsc0 = rdtsc();
	irq_mode = use_irq;
	irq_init(use_irq);
}

u32 now_ms(void)
{
	return (u32)((rdtsc() - tsc0) / tsc_khz);
}

u32 time_tsc_khz(void)
{
	return tsc_khz;
}

void idle(void)
{
	if (irq_mode)
		idle_hlt();
	else
		__asm__ __volatile__("pause");
}
