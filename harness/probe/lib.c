/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Minimal string, formatting, parsing and CRC-32 helpers. */
#include "probe.h"

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;

	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			break;
	}
	return 0;
}

char *fmt_u32(char *p, u32 v)
{
	char tmp[10];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	*p = 0;
	return p;
}

char *fmt_hex(char *p, u32 v, int digits)
{
	while (digits--)
		*p++ = "0123456789abcdef"[(v >> (4 * digits)) & 0xf];
	*p = 0;
	return p;
}

char *fmt_str(char *p, const char *s)
{
	while (*s)
		*p++ = *s++;
	*p = 0;
	return p;
}

char *fmt_ip(char *p, u32 ip)
{
	for (int i = 3; i >= 0; i--) {
		p = fmt_u32(p, (ip >> (8 * i)) & 0xff);
		if (i)
			*p++ = '.';
	}
	*p = 0;
	return p;
}

char *fmt_mac(char *p, const u8 *mac)
{
	for (int i = 0; i < 6; i++) {
		p = fmt_hex(p, mac[i], 2);
		if (i < 5)
			*p++ = ':';
	}
	*p = 0;
	return p;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decimal, or hexadecimal with a 0x prefix. */
int parse_u32(const char *s, u32 *out)
{
	u32 v = 0;
	int base = 10;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return -1;
	for (; *s; s++) {
		int d = hexval(*s);

		if (d < 0 || d >= base)
			return -1;
		v = v * (u32)base + (u32)d;
	}
	*out = v;
	return 0;
}

int parse_ip(const char *s, u32 *out)
{
	u32 ip = 0;

	for (int i = 0; i < 4; i++) {
		u32 part = 0;
		int digits = 0;

		while (*s >= '0' && *s <= '9') {
			part = part * 10 + (u32)(*s++ - '0');
			digits++;
		}
		if (!digits || part > 255)
			return -1;
		ip = (ip << 8) | part;
		if (i < 3 && *s++ != '.')
			return -1;
	}
	if (*s)
		return -1;
	*out = ip;
	return 0;
}

int parse_mac(const char *s, u8 *mac)
{
	for (int i = 0; i < 6; i++) {
		int hi = hexval(s[0]), lo = hexval(s[1]);

		if (hi < 0 || lo < 0)
			return -1;
		mac[i] = (u8)(hi << 4 | lo);
		s += 2;
		if (i < 5 && *s++ != ':')
			return -1;
	}
	return *s ? -1 : 0;
}

static u32 crc_table[256];

void crc32_init(void)
{
	for (u32 i = 0; i < 256; i++) {
		u32 c = i;

		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

/* IEEE CRC-32, the same value as Python's zlib.crc32(). */
u32 crc32(const void *buf, size_t len)
{
	const u8 *p = buf;
	u32 c = 0xffffffffu;

	while (len--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}
