/* SPDX-License-Identifier: GPL-2.0-or-later */
/* virtio-net (legacy): raw Ethernet with a tiny ARP and IPv4/UDP sender. */
#include "probe.h"

#define NET_CFG_MAC 0x14	/* device config without MSI-X */
#define VIRTIO_NET_F_MAC (1u << 5)
#define NET_HDR_LEN 10		/* struct virtio_net_hdr, no mergeable buffers */
#define RX_BUFS 8
#define RX_BUF_LEN 1536
#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static u8 rx_ring[3 * 4096] __attribute__((aligned(4096)));
static u8 tx_ring[3 * 4096] __attribute__((aligned(4096)));
static u8 rx_bufs[RX_BUFS][RX_BUF_LEN];
static u8 tx_hdr[NET_HDR_LEN];
static u8 tx_frame[1514];
static struct vq rxq, txq;
static struct net_config *cfg;
static u8 nh_mac[6];
static int nh_known;
static u16 ip_id;

static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static void put32(u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

static u16 get16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static u32 get32(const u8 *p)
{
	return (u32)get16(p) << 16 | get16(p + 2);
}

static u32 next_hop(void)
{
	return ((cfg->dst ^ cfg->ip) & cfg->mask) ? cfg->gw : cfg->dst;
}

static void rx_post(u16 i)
{
	rxq.desc[i].addr = (u32)rx_bufs[i];
	rxq.desc[i].len = RX_BUF_LEN;
	rxq.desc[i].flags = VRING_DESC_F_WRITE;
	rxq.desc[i].next = 0;
	vq_submit(&rxq, i);
}

int net_init(u16 io, struct net_config *c)
{
	u32 features;

	cfg = c;
	virtio_reset_and_ack(io, VIRTIO_NET_F_MAC, &features);
	if (vq_setup(&rxq, io, 0, rx_ring, sizeof(rx_ring)) ||
	    vq_setup(&txq, io, 1, tx_ring, sizeof(tx_ring)))
		return -1;
	if (!cfg->mac_set && (features & VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			cfg->mac[i] = inb((u16)(io + NET_CFG_MAC + i));
		cfg->mac_set = 1;
	}
	virtio_driver_ok(io);
	for (u16 i = 0; i < RX_BUFS; i++)
		rx_post(i);
	if (cfg->dmac_set) {
		memcpy(nh_mac, cfg->dmac, 6);
		nh_known = 1;
	}
	return 0;
}

const u8 *net_mac(void)
{
	return cfg->mac;
}

int net_resolved(void)
{
	return nh_known;
}

/* Send tx_frame[0..len); one frame in flight at a time. */
static int tx(u16 len, u32 timeout_ms)
{
	u32 id, rlen, start = now_ms();

	while (txq.avail_idx != txq.last_used) {
		if (vq_poll(&txq, &id, &rlen))
			continue;
		if (now_ms() - start > timeout_ms)
			return -1;
	}
	memset(tx_hdr, 0, sizeof(tx_hdr));
	txq.desc[0].addr = (u32)tx_hdr;
	txq.desc[0].len = NET_HDR_LEN;
	txq.desc[0].flags = VRING_DESC_F_NEXT;
	txq.desc[0].next = 1;
	txq.desc[1].addr = (u32)tx_frame;
	txq.desc[1].len = len < 60 ? 60 : len;
	txq.desc[1].flags = 0;
	txq.desc[1].next = 0;
	vq_submit(&txq, 0);
	while (!vq_poll(&txq, &id, &rlen)) {
		if (now_ms() - start > timeout_ms)
			return -1;
	}
	return 0;
}

static u8 *eth_header(const u8 *dst, u16 type)
{
	memcpy(tx_frame, dst, 6);
	memcpy(tx_frame + 6, cfg->mac, 6);
	put16(tx_frame + 12, type);
	return tx_frame + 14;
}

static void arp_send(u16 oper, const u8 *tha, u32 tpa, const u8 *eth_dst)
{
	u8 *a;

	memset(tx_frame, 0, 60);
	a = eth_header(eth_dst, ETH_ARP);
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, oper);
	memcpy(a + 8, cfg->mac, 6);
	put32(a + 14, cfg->ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	tx(60, 100);
}

void net_request_neighbour(void)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static const u8 zero[6];

	if (!nh_known)
		arp_send(1, zero, next_hop(), bcast);
}

static void handle_arp(const u8 *a, u32 len)
{
	u16 oper;
	u32 spa, tpa;

	if (len < 28 || get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4)
		return;
	oper = get16(a + 6);
	spa = get32(a + 14);
	tpa = get32(a + 24);
	if (spa == next_hop() && !cfg->dmac_set && !nh_known) {
		char line[64], *p;

		memcpy(nh_mac, a + 8, 6);
		nh_known = 1;
		p = fmt_str(line, "PROBE: arp ");
		p = fmt_ip(p, spa);
		p = fmt_str(p, " is-at ");
		p = fmt_mac(p, nh_mac);
		fmt_str(p, "\n");
		serial_puts(line);
	}
	if (oper == 1 && tpa == cfg->ip) {
		u8 sha[6];

		memcpy(sha, a + 8, 6);
		arp_send(2, sha, spa, sha);
	}
}

void net_poll(void)
{
	u32 id, len;

	while (vq_poll(&rxq, &id, &len)) {
		if (id >= RX_BUFS)
			continue;
		if (len >= NET_HDR_LEN + 14) {
			const u8 *f = rx_bufs[id] + NET_HDR_LEN;

			if (get16(f + 12) == ETH_ARP)
				handle_arp(f + 14, len - NET_HDR_LEN - 14);
		}
		rx_post((u16)id);
	}
}

static u16 ip_checksum(const u8 *p, u32 len)
{
	u32 sum = 0;

	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

int net_send_udp(const void *payload, u16 len, u32 timeout_ms)
{
	u8 *ip, *udp;

	if (!nh_known || len > 1400)
		return -1;
	memset(tx_frame, 0, 60);
	ip = eth_header(nh_mac, ETH_IP);
	ip[0] = 0x45;
	put16(ip + 2, (u16)(20 + 8 + len));
	put16(ip + 4, ip_id++);
	put16(ip + 6, 0x4000);	/* don't fragment */
	ip[8] = 64;
	ip[9] = 17;
	put32(ip + 12, cfg->ip);
	put32(ip + 16, cfg->dst);
	put16(ip + 10, ip_checksum(ip, 20));
	udp = ip + 20;
	put16(udp, cfg->sport);
	put16(udp + 2, cfg->dport);
	put16(udp + 4, (u16)(8 + len));
	put16(udp + 6, 0);	/* no UDP checksum (allowed for IPv4) */
	memcpy(udp + 8, payload, len);
	return tx((u16)(14 + 20 + 8 + len), timeout_ms);
}
