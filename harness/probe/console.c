/* SPDX-License-Identifier: GPL-2.0-or-later */
/* COM1 (16550 at 0x3f8): the probe's console and command input. */
#include "probe.h"

#define COM1 0x3f8
#define LSR_DR 0x01
#define LSR_THRE 0x20

void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts: the probe polls */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0x07);	/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);	/* DTR, RTS */
}

void serial_putc(char c)
{
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & LSR_THRE); i++)
		;
	outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
	for (; *s; s++) {
		if (*s == '\n')
			serial_putc('\r');
		serial_putc(*s);
	}
}

int serial_getc(void)
{
	if (!(inb(COM1 + 5) & LSR_DR))
		return -1;
	return inb(COM1);
}
