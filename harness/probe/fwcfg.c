/* SPDX-License-Identifier: GPL-2.0-or-later */
/* QEMU fw_cfg over I/O ports: read one named file (-fw_cfg name=...). */
#include "probe.h"

#define FW_CFG_SEL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_FILE_DIR 0x19

static void read_bytes(void *buf, u32 n)
{
	/* One string I/O instruction: a single exit for the whole buffer. */
	__asm__ __volatile__("rep insb"
			     : "+D"(buf), "+c"(n)
			     : "d"(FW_CFG_DATA)
			     : "memory");
}

static u32 be32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

int fwcfg_read_file(const char *name, char *buf, u32 max)
{
	u8 sig[4], entry[64];
	u32 count;

	outw(FW_CFG_SEL, FW_CFG_SIGNATURE);
	read_bytes(sig, 4);
	if (sig[0] != 'Q' || sig[1] != 'E' || sig[2] != 'M' || sig[3] != 'U')
		return -1;
	outw(FW_CFG_SEL, FW_CFG_FILE_DIR);
	read_bytes(sig, 4);
	count = be32(sig);
	for (u32 i = 0; i < count; i++) {
		u32 size;

		read_bytes(entry, sizeof(entry));	/* size, select, reserved, name[56] */
		if (strncmp((const char *)entry + 8, name, 56))
			continue;
		size = be32(entry);
		if (size > max - 1)
			size = max - 1;
		outw(FW_CFG_SEL, (u16)(entry[4] << 8 | entry[5]));
		read_bytes(buf, size);
		buf[size] = 0;
		return (int)size;
	}
	return -1;
}
