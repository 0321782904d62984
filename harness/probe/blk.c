/* SPDX-License-Identifier: GPL-2.0-or-later */
/* virtio-blk: synchronous single-sector writes on queue 0. */
#include "probe.h"

#define VIRTIO_BLK_T_OUT 1
#define BLK_CFG_CAPACITY 0x14	/* device config without MSI-X */

struct blk_req_hdr {
	u32 type;
	u32 ioprio;
	u64 sector;
} __attribute__((packed));

static u8 ring_mem[3 * 4096] __attribute__((aligned(4096)));
static struct vq q;
static struct blk_req_hdr hdr;
static u8 data[512];
static volatile u8 status;
static u16 io_base;

int blk_init(u16 io)
{
	u32 features;

	io_base = io;
	virtio_reset_and_ack(io, 0, &features);
	if (vq_setup(&q, io, 0, ring_mem, sizeof(ring_mem)))
		return -1;
	virtio_driver_ok(io);
	return 0;
}

u32 blk_capacity(void)
{
	/* 64-bit sector count; the probe only needs the low word. */
	if (inl(io_base + BLK_CFG_CAPACITY + 4))
		return 0xffffffffu;
	return inl(io_base + BLK_CFG_CAPACITY);
}

int blk_write(u32 sector, const void *data512, u32 timeout_ms)
{
	u32 id, len, start = now_ms();

	/* A request that timed out earlier still owns the buffers. */
	while (q.avail_idx != q.last_used) {
		if (vq_poll(&q, &id, &len))
			continue;
		if (now_ms() - start > timeout_ms)
			return BLK_TIMEOUT;
	}
	hdr.type = VIRTIO_BLK_T_OUT;
	hdr.ioprio = 0;
	hdr.sector = sector;
	memcpy(data, data512, 512);
	status = 0xff;

	q.desc[0].addr = (u32)&hdr;
	q.desc[0].len = sizeof(hdr);
	q.desc[0].flags = VRING_DESC_F_NEXT;
	q.desc[0].next = 1;
	q.desc[1].addr = (u32)data;
	q.desc[1].len = 512;
	q.desc[1].flags = VRING_DESC_F_NEXT;
	q.desc[1].next = 2;
	q.desc[2].addr = (u32)&status;
	q.desc[2].len = 1;
	q.desc[2].flags = VRING_DESC_F_WRITE;
	q.desc[2].next = 0;
	vq_submit(&q, 0);

	while (!vq_poll(&q, &id, &len)) {
		if (now_ms() - start > timeout_ms)
			return BLK_TIMEOUT;
	}
	if (status == 0)
		return BLK_OK;
	return status == 2 ? BLK_UNSUPP : BLK_IOERR;
}
