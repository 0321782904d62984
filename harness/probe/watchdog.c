/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Watchdogs: the ISA ib700 (ports 0x441/0x443) or the PCI i6300esb.
 * Arming starts the countdown; feeding restarts it.
 */
#include "probe.h"

#define IB700_ENABLE 0x443

#define ESB_CONFIG_REG 0x60	/* PCI config: reboot enabled, 1 kHz clock */
#define ESB_LOCK_REG 0x68
#define ESB_WDT_ENABLE 0x02
#define ESB_TIMER1 0x00		/* MMIO */
#define ESB_TIMER2 0x04
#define ESB_RELOAD 0x0c

static u8 esb_dev;
static volatile u8 *esb;	/* MMIO BAR0, 0 when using ib700 */
static u32 ib700_timeout;

int watchdog_init(int want_esb)
{
	if (want_esb && !pci_find(0x8086, 0x25ab, &esb_dev))
		esb = (volatile u8 *)pci_enable_mem_bar0(esb_dev);
	return esb != 0;
}

static void esb_unlock(void)
{
	esb[ESB_RELOAD] = 0x80;
	esb[ESB_RELOAD] = 0x86;
}

static void esb_reload(void)
{
	esb_unlock();
	*(volatile u16 *)(esb + ESB_RELOAD) = 0x100;
}

void watchdog_arm(u32 timeout_s)
{
	/* ib700 takes an even number of seconds 0..30 as (30 - t) / 2. */
	u32 idx = (30 - timeout_s) / 2;

	ib700_timeout = idx > 15 ? 15 : idx;
	if (!esb) {
		outb(IB700_ENABLE, (u8)ib700_timeout);
		return;
	}
	/*
	 * Two stages of ~1 ms ticks (2^15 PCI clocks of 30 ns); QEMU acts
	 * when the second stage expires, so split the timeout over both.
	 */
	u32 ticks = timeout_s * 1000 / 2 + 1;

	pci_write16(0, esb_dev, 0, ESB_CONFIG_REG, 0);
	esb_unlock();
	*(volatile u32 *)(esb + ESB_TIMER1) = ticks;
	esb_unlock();
	*(volatile u32 *)(esb + ESB_TIMER2) = ticks;
	esb_reload();
	pci_write8(0, esb_dev, 0, ESB_LOCK_REG, ESB_WDT_ENABLE);
}

void watchdog_feed(void)
{
	if (esb)
		esb_reload();
	else
		outb(IB700_ENABLE, (u8)ib700_timeout);
}
