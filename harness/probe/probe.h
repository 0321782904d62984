/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Shared declarations of the probe guest (freestanding, 32-bit, flat). */
#ifndef PROBE_H
#define PROBE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef __SIZE_TYPE__ size_t;

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline void outb(u16 port, u8 v)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outw(u16 port, u16 v)
{
	__asm__ __volatile__("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
	__asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;

	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u16 inw(u16 port)
{
	u16 v;

	__asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;

	__asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* lib.c */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
char *fmt_u32(char *p, u32 v);
char *fmt_hex(char *p, u32 v, int digits);
char *fmt_str(char *p, const char *s);
char *fmt_ip(char *p, u32 ip);
char *fmt_mac(char *p, const u8 *mac);
int parse_u32(const char *s, u32 *out);
int parse_ip(const char *s, u32 *out);
int parse_mac(const char *s, u8 *mac);
void crc32_init(void);
u32 crc32(const void *buf, size_t len);

/* console.c: COM1 */
void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
int serial_getc(void);		/* -1 if nothing pending */

/* time.c */
extern volatile u32 probe_ticks;
void time_init(int use_irq);
u32 now_ms(void);
u32 time_tsc_khz(void);
void idle(void);

/* fwcfg.c */
int fwcfg_read_file(const char *name, char *buf, u32 max);

/* pci.c */
u32 pci_read32(u8 bus, u8 dev, u8 fn, u8 off);
void pci_write16(u8 bus, u8 dev, u8 fn, u8 off, u16 v);
void pci_write8(u8 bus, u8 dev, u8 fn, u8 off, u8 v);
u32 pci_enable_mem_bar0(u8 dev);
int pci_find(u16 vendor, u16 device, u8 *dev_out);
u16 pci_enable_io_bar0(u8 dev);

/* virtio.c: legacy (0.9.5) virtio over the I/O BAR */
#define VQ_MAX 256

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct vq {
	u16 io;			/* device I/O base */
	u16 index;		/* queue number */
	u16 size;
	u16 last_used;
	u16 avail_idx;
	struct vring_desc *desc;
	volatile u16 *avail;	/* flags, idx, ring[size] */
	volatile u16 *used;	/* flags, idx, {u32 id, u32 len}[size] */
};

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

int virtio_reset_and_ack(u16 io, u32 want_features, u32 *features);
int vq_setup(struct vq *q, u16 io, u16 index, void *mem, size_t mem_size);
void vq_submit(struct vq *q, u16 head);
int vq_poll(struct vq *q, u32 *id, u32 *len);	/* 1 if a used entry was taken */
void virtio_driver_ok(u16 io);

/* blk.c */
int blk_init(u16 io);
u32 blk_capacity(void);
int blk_write(u32 sector, const void *data512, u32 timeout_ms);

#define BLK_OK 0
#define BLK_IOERR 1
#define BLK_UNSUPP 2
#define BLK_TIMEOUT 3

/* net.c */
struct net_config {
	u8 mac[6];
	int mac_set;
	u32 ip, mask, gw, dst;
	u16 dport, sport;
	u8 dmac[6];
	int dmac_set;
};

int net_init(u16 io, struct net_config *cfg);
void net_poll(void);
int net_resolved(void);
void net_request_neighbour(void);
int net_send_udp(const void *payload, u16 len, u32 timeout_ms);
const u8 *net_mac(void);

/* watchdog.c */
int watchdog_init(int want_esb);	/* 1 if an i6300esb is used, else ib700 */
void watchdog_arm(u32 timeout_s);
void watchdog_feed(void);

/* cpu.S */
void idle_hlt(void);
void emu_iret(void);
void emu_enter_nested(void);
void emu_jump(u32 addr) __attribute__((noreturn));
void irq0_entry(void);
void irq_other_entry(void);
void exc_entry(void);

#endif
