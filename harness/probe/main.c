/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Probe guest main loop: read the settings (multiboot command line and/or
 * the fw_cfg file opt/frozen/cmdline), find the legacy virtio devices,
 * then write counter records to the disk, send them as UDP datagrams and
 * print them on COM1, obeying one-byte commands from COM1.
 */
#include "probe.h"

#define MB_BOOT_MAGIC 0x2badb002u
#define MB_INFO_CMDLINE (1u << 2)
#define MARKER_MAX 64
#define PVPANIC_PORT 0x505

struct mb_info {
	u32 flags;
	u32 mem_lower, mem_upper, boot_device;
	u32 cmdline;
} __attribute__((packed));

struct probe_config {
	char marker[MARKER_MAX + 1];
	struct net_config net;
	int use_blk, use_net, use_irq;
	u32 period_ms, sectors;
	u32 wdt_timeout_s;
	int wdt_feed;
	int use_esb;		/* prefer an i6300esb over ib700 if present */
	u32 emu_addr;
	int emu_method;		/* 0 all in turn, 1 iret, 2 enter, 3 mmio */
};

static struct probe_config cfg = {
	.marker = "none",
	.net = {
		.ip = 0x0a00020f,	/* 10.0.2.15 */
		.mask = 0xffffff00,
		.gw = 0x0a000202,	/* 10.0.2.2 */
		.dst = 0x0a000202,
		.sport = 40000,
	},
	.use_blk = 1,
	.use_net = 1,
	.use_irq = 1,
	.period_ms = 50,
	.sectors = 64,
	.wdt_timeout_s = 2,
	.use_esb = 1,
	.emu_addr = 0xfebf0000,
};

/* Kept in RAM for memory-dump checks: "FROZEN-MARKER:<marker>". */
static char marker_tag[16 + MARKER_MAX];
/* "FROZEN-LAST:<marker>:<N>\n" for the last record that completed. */
static char last_record[32 + MARKER_MAX];
static u8 record[512];
static char fw_cmdline[512];
static int have_blk, have_net, have_esb, running = 1, feeding;

void probe_main(u32 magic, const struct mb_info *mbi);
void probe_exception(void);

static void say(const char *a, const char *b)
{
	serial_puts("PROBE: ");
	serial_puts(a);
	if (b)
		serial_puts(b);
	serial_puts("\n");
}

static void say_u32(const char *a, u32 v)
{
	char buf[12];

	fmt_u32(buf, v);
	say(a, buf);
}

static void put_le32(u8 *p, u32 v)
{
	p[0] = (u8)v;
	p[1] = (u8)(v >> 8);
	p[2] = (u8)(v >> 16);
	p[3] = (u8)(v >> 24);
}

static int on_off(const char *v)
{
	return v[0] == '1' || v[0] == 'y' || !strncmp(v, "on", 3);
}

static void set_option(const char *key, size_t klen, const char *val)
{
	struct net_config *n = &cfg.net;
	int bad = 0;

#define KEY(s) (klen == sizeof(s) - 1 && !strncmp(key, s, klen))
	if (KEY("marker")) {
		size_t len = strlen(val);

		if (len > MARKER_MAX)
			len = MARKER_MAX;
		memcpy(cfg.marker, val, len);
		cfg.marker[len] = 0;
	} else if (KEY("ip")) {
		bad = parse_ip(val, &n->ip);
	} else if (KEY("mask")) {
		bad = parse_ip(val, &n->mask);
	} else if (KEY("gw")) {
		bad = parse_ip(val, &n->gw);
	} else if (KEY("dst")) {
		bad = parse_ip(val, &n->dst);
	} else if (KEY("port") || KEY("sport")) {
		u32 v;

		bad = parse_u32(val, &v) || v > 65535;
		if (!bad && KEY("port"))
			n->dport = (u16)v;
		else if (!bad)
			n->sport = (u16)v;
	} else if (KEY("mac")) {
		bad = parse_mac(val, n->mac);
		n->mac_set = !bad;
	} else if (KEY("dmac")) {
		bad = parse_mac(val, n->dmac);
		n->dmac_set = !bad;
	} else if (KEY("blk")) {
		cfg.use_blk = on_off(val);
	} else if (KEY("net")) {
		cfg.use_net = on_off(val);
	} else if (KEY("idle")) {
		cfg.use_irq = !strncmp(val, "hlt", 4);
	} else if (KEY("period")) {
		bad = parse_u32(val, &cfg.period_ms);
	} else if (KEY("sectors")) {
		bad = parse_u32(val, &cfg.sectors) || !cfg.sectors;
	} else if (KEY("wdt_timeout")) {
		bad = parse_u32(val, &cfg.wdt_timeout_s) || cfg.wdt_timeout_s > 30;
	} else if (KEY("wdt")) {
		cfg.use_esb = strncmp(val, "ib700", 6) != 0;
	} else if (KEY("wdt_feed")) {
		cfg.wdt_feed = on_off(val);
	} else if (KEY("emu")) {
		cfg.emu_method = !strncmp(val, "iret", 5) ? 1 : !strncmp(val, "enter", 6) ? 2
			: !strncmp(val, "mmio", 5) ? 3 : 0;
	} else if (KEY("emu_addr")) {
		bad = parse_u32(val, &cfg.emu_addr);
	} else {
		say("ignoring option ", key);
	}
#undef KEY
	if (bad)
		say("bad value for option ", key);
}

/* Space-separated key=value words; other words are ignored. */
static void parse_cmdline(char *s)
{
	while (*s) {
		char *word, *eq = 0;

		while (*s == ' ')
			s++;
		word = s;
		while (*s && *s != ' ') {
			if (*s == '=' && !eq)
				eq = s;
			s++;
		}
		if (*s)
			*s++ = 0;
		if (eq)
			set_option(word, (size_t)(eq - word), eq + 1);
	}
}

/* Text form shared by the disk record and the datagram. */
static char *record_text(char *p, u32 n)
{
	p = fmt_str(p, "FROZEN-RECORD:");
	p = fmt_str(p, cfg.marker);
	*p++ = ':';
	p = fmt_u32(p, n);
	return fmt_str(p, "\n");
}

/* 512 bytes, little endian; CRC-32 of bytes 0..507 at 508. */
static void build_sector(const char *magic, u32 n, u32 sector)
{
	size_t mlen = strlen(cfg.marker);

	memset(record, 0, sizeof(record));
	memcpy(record, magic, 8);
	put_le32(record + 8, n);
	put_le32(record + 12, sector);
	put_le32(record + 16, now_ms());
	put_le32(record + 20, (u32)mlen);
	memcpy(record + 24, cfg.marker, mlen);
	if (n)
		record_text((char *)record + 88, n);
	else
		fmt_str(fmt_str(fmt_str((char *)record + 88, "FROZEN-HEADER:"), cfg.marker), "\n");
	put_le32(record + 508, crc32(record, 508));
}

static const char *blk_result(int r)
{
	static const char *const names[] = { "ok", "ioerr", "unsupp", "timeout" };

	return names[r];
}

static void emulation_error(void)
{
	char buf[12];

	if (cfg.emu_method == 0 || cfg.emu_method == 1) {
		say("emulation-error: protected-mode iret", 0);
		emu_iret();
		say("emulation-error: iret was executed natively", 0);
	}
	if (cfg.emu_method == 0 || cfg.emu_method == 2) {
		say("emulation-error: enter $0,$1", 0);
		emu_enter_nested();
		say("emulation-error: enter was executed natively", 0);
	}
	if (cfg.emu_method == 0 || cfg.emu_method == 3) {
		fmt_hex(buf, cfg.emu_addr, 8);
		say("emulation-error: jumping to 0x", buf);
		emu_jump(cfg.emu_addr);
	}
}

static void poll_serial(void)
{
	int c;

	while ((c = serial_getc()) >= 0) {
		switch (c) {
		case 'p':
			say("panic via pvpanic", 0);
			outb(PVPANIC_PORT, 1);
			break;
		case 'w':
			watchdog_arm(cfg.wdt_timeout_s);
			feeding = 0;
			say_u32(have_esb ? "watchdog i6300esb armed, not fed, timeout s="
				: "watchdog ib700 armed, not fed, timeout s=", cfg.wdt_timeout_s);
			break;
		case 'e':
			emulation_error();
			break;
		case 's':
			running = 0;
			say("stopped", 0);
			break;
		case 'g':
			running = 1;
			say("going", 0);
			break;
		default:
			break;
		}
	}
}

static void service(void)
{
	poll_serial();
	if (have_net)
		net_poll();
}

static void do_record(u32 n)
{
	char line[48 + MARKER_MAX], *p;
	int br = -1, nr = -1;
	u32 sector = 1 + (n - 1) % cfg.sectors;

	if (have_blk) {
		build_sector("FRZREC01", n, sector);
		br = blk_write(sector, record, 1000);
	}
	if (have_net && cfg.net.dport) {
		if (!net_resolved())
			net_request_neighbour();
		p = record_text(line, n);
		nr = net_send_udp(line, (u16)(p - line), 200);
	}
	/* Completed: publish it in RAM first, then on the console. */
	p = fmt_str(last_record, "FROZEN-LAST:");
	p = fmt_str(p, cfg.marker);
	*p++ = ':';
	fmt_str(fmt_u32(p, n), "\n");
	p = fmt_u32(fmt_str(line, "record "), n);
	p = fmt_str(fmt_str(p, " blk="), br < 0 ? "off" : blk_result(br));
	p = fmt_str(p, " net=");
	p = fmt_str(p, nr == 0 ? "ok" : !have_net || !cfg.net.dport ? "off" : "fail");
	p = fmt_u32(fmt_str(p, " t="), now_ms());
	fmt_str(p, "\n");
	serial_puts(line);
}

void probe_exception(void)
{
	serial_puts("\nPROBE: CPU exception, halting\n");
}

void probe_main(u32 magic, const struct mb_info *mbi)
{
	char buf[64], *p;
	u8 dev;
	u32 n = 0;

	serial_init();
	serial_puts("\nPROBE: frozen probe guest\n");
	if (magic == MB_BOOT_MAGIC && (mbi->flags & MB_INFO_CMDLINE)) {
		/* QEMU puts the kernel file name first: skip that word. */
		char *s = (char *)mbi->cmdline;

		while (*s && *s != ' ')
			s++;
		parse_cmdline(s);
	}
	/* -fw_cfg name=opt/frozen/cmdline,string=...: the only way with -bios. */
	if (fwcfg_read_file("opt/frozen/cmdline", fw_cmdline, sizeof(fw_cmdline)) >= 0)
		parse_cmdline(fw_cmdline);
	fmt_str(fmt_str(marker_tag, "FROZEN-MARKER:"), cfg.marker);
	say("marker=", cfg.marker);
	crc32_init();
	time_init(cfg.use_irq);
	say_u32("tsc kHz=", time_tsc_khz());

	if (cfg.use_blk && !pci_find(0x1af4, 0x1001, &dev)) {
		u16 io = pci_enable_io_bar0(dev);

		if (io && !blk_init(io)) {
			u32 cap = blk_capacity();

			if (cap < 2)
				cfg.sectors = 0;
			else if (cfg.sectors > cap - 1)
				cfg.sectors = cap - 1;
			have_blk = cfg.sectors > 0;
			say_u32("virtio-blk ok, record sectors=", cfg.sectors);
		} else {
			say("virtio-blk init failed", 0);
		}
	}
	if (have_blk) {
		build_sector("FRZHDR01", 0, 0);
		put_le32(record + 8, 1);		/* format version */
		put_le32(record + 12, cfg.sectors);
		put_le32(record + 508, crc32(record, 508));
		say("header write ", blk_result(blk_write(0, record, 1000)));
	}
	if (cfg.use_net && !pci_find(0x1af4, 0x1000, &dev)) {
		u16 io = pci_enable_io_bar0(dev);

		if (io && !net_init(io, &cfg.net)) {
			have_net = 1;
			p = fmt_str(buf, "virtio-net ok, mac=");
			p = fmt_mac(p, net_mac());
			p = fmt_ip(fmt_str(p, " ip="), cfg.net.ip);
			p = fmt_ip(fmt_str(p, " dst="), cfg.net.dst);
			fmt_u32(fmt_str(p, ":"), cfg.net.dport);
			say(buf, 0);
			net_request_neighbour();
			for (u32 t = now_ms(); !net_resolved() && now_ms() - t < 500;)
				net_poll();
		} else {
			say("virtio-net init failed", 0);
		}
	}
	have_esb = watchdog_init(cfg.use_esb);
	if (cfg.wdt_feed) {
		watchdog_arm(cfg.wdt_timeout_s);
		feeding = 1;
	}
	say("ready", 0);

	for (;;) {
		u32 next = now_ms() + cfg.period_ms;

		service();
		if (running)
			do_record(++n);
		if (feeding)
			watchdog_feed();
		while ((int)(next - now_ms()) > 0) {
			service();
			idle();
		}
	}
}
