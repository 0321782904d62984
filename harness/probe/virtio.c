/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Legacy (virtio 0.9.5) PCI transport over the I/O BAR, split virtqueues. */
#include "probe.h"

#define VIRTIO_HOST_FEATURES 0x00
#define VIRTIO_GUEST_FEATURES 0x04
#define VIRTIO_QUEUE_PFN 0x08
#define VIRTIO_QUEUE_NUM 0x0c
#define VIRTIO_QUEUE_SEL 0x0e
#define VIRTIO_QUEUE_NOTIFY 0x10
#define VIRTIO_STATUS 0x12

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4

#define VRING_AVAIL_F_NO_INTERRUPT 1

int virtio_reset_and_ack(u16 io, u32 want_features, u32 *features)
{
	u32 host;

	outb(io + VIRTIO_STATUS, 0);
	outb(io + VIRTIO_STATUS, STATUS_ACK);
	outb(io + VIRTIO_STATUS, STATUS_ACK | STATUS_DRIVER);
	host = inl(io + VIRTIO_HOST_FEATURES);
	*features = host & want_features;
	outl(io + VIRTIO_GUEST_FEATURES, *features);
	return 0;
}

static u32 align_page(u32 v)
{
	return (v + 4095) & ~4095u;
}

/* Legacy layout: descriptors, avail ring, then the used ring on the next page. */
int vq_setup(struct vq *q, u16 io, u16 index, void *mem, size_t mem_size)
{
	u32 base = (u32)mem;
	u32 used_off;
	u16 size;

	outw(io + VIRTIO_QUEUE_SEL, index);
	size = inw(io + VIRTIO_QUEUE_NUM);
	if (!size || size > VQ_MAX || (base & 4095))
		return -1;
	used_off = align_page(16u * size + 6u + 2u * size);
	if (used_off + 6u + 8u * size > mem_size)
		return -1;
	/* mem is in .bss, cleared at boot; the device was just reset. */
	q->io = io;
	q->index = index;
	q->size = size;
	q->last_used = 0;
	q->avail_idx = 0;
	q->desc = mem;
	q->avail = (volatile u16 *)(base + 16u * size);
	q->used = (volatile u16 *)(base + used_off);
	q->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
	outl(io + VIRTIO_QUEUE_PFN, base >> 12);
	return 0;
}

void vq_submit(struct vq *q, u16 head)
{
	q->avail[2 + q->avail_idx % q->size] = head;
	barrier();
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	barrier();
	outw(q->io + VIRTIO_QUEUE_NOTIFY, q->index);
}

int vq_poll(struct vq *q, u32 *id, u32 *len)
{
	volatile u32 *elem;

	if (q->used[1] == q->last_used)
		return 0;
	barrier();
	elem = (volatile u32 *)(q->used + 2) + 2u * (q->last_used % q->size);
	*id = elem[0];
	*len = elem[1];
	q->last_used++;
	return 1;
}

void virtio_driver_ok(u16 io)
{
	outb(io + VIRTIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
}
