/* SPDX-License-Identifier: GPL-2.0-or-later */
/* PCI configuration mechanism #1 (0xcf8/0xcfc), bus 0 only. */
#include "probe.h"

static u32 cfg_addr(u8 bus, u8 dev, u8 fn, u8 off)
{
	return 0x80000000u | (u32)bus << 16 | (u32)dev << 11 | (u32)fn << 8 | (off & 0xfc);
}

u32 pci_read32(u8 bus, u8 dev, u8 fn, u8 off)
{
	outl(0xcf8, cfg_addr(bus, dev, fn, off));
	return inl(0xcfc);
}

void pci_write16(u8 bus, u8 dev, u8 fn, u8 off, u16 v)
{
	outl(0xcf8, cfg_addr(bus, dev, fn, off));
	outw((u16)(0xcfc + (off & 2)), v);
}

void pci_write8(u8 bus, u8 dev, u8 fn, u8 off, u8 v)
{
	outl(0xcf8, cfg_addr(bus, dev, fn, off));
	outb((u16)(0xcfc + (off & 3)), v);
}

int pci_find(u16 vendor, u16 device, u8 *dev_out)
{
	u32 want = (u32)device << 16 | vendor;

	for (u8 dev = 0; dev < 32; dev++) {
		if (pci_read32(0, dev, 0, 0) == want) {
			*dev_out = dev;
			return 0;
		}
	}
	return -1;
}

static void pci_write32(u8 bus, u8 dev, u8 fn, u8 off, u32 v)
{
	outl(0xcf8, cfg_addr(bus, dev, fn, off));
	outl(0xcfc, v);
}

/* Next free addresses when there is no BIOS to assign BARs (-bios). */
static u32 next_io = 0xc000;
static u32 next_mem = 0xfe000000;

/* Size a BAR and place it at the next free address of its kind. */
static u32 assign_bar(u8 dev, u8 off, u32 mask, u32 *next)
{
	u32 size;

	pci_write32(0, dev, 0, off, 0xffffffff);
	size = ~(pci_read32(0, dev, 0, off) & mask) + 1;
	if (mask == 0xfffc)
		size &= 0xffff;
	if (!size)
		return 0;
	*next = (*next + size - 1) & ~(size - 1);
	pci_write32(0, dev, 0, off, *next);
	*next += size;
	return pci_read32(0, dev, 0, off) & mask;
}

/* Return the (assigned) 32-bit memory BAR0 with memory decoding enabled; 0 if none. */
u32 pci_enable_mem_bar0(u8 dev)
{
	u32 bar = pci_read32(0, dev, 0, 0x10);
	u16 cmd = (u16)pci_read32(0, dev, 0, 0x04);

	if (bar & 1)
		return 0;
	bar &= 0xfffffff0;
	if (!bar)
		bar = assign_bar(dev, 0x10, 0xfffffff0, &next_mem);
	pci_write16(0, dev, 0, 0x04, cmd | 0x2);
	return bar;
}

/*
 * Return the I/O base of BAR0 (assigning one if firmware did not), with
 * I/O decoding and bus mastering enabled; 0 if BAR0 is not an I/O BAR.
 */
u16 pci_enable_io_bar0(u8 dev)
{
	u32 bar = pci_read32(0, dev, 0, 0x10);
	u16 cmd = (u16)pci_read32(0, dev, 0, 0x04);

	if (!(bar & 1))
		return 0;
	bar &= 0xfffc;
	if (!bar)
		bar = assign_bar(dev, 0x10, 0xfffc, &next_io);
	pci_write16(0, dev, 0, 0x04, cmd | 0x1 | 0x4);
	return (u16)bar;
}
