/* SPDX-License-Identifier: Apache-2.0
 *
 * parse.h: find the AggBox header in a packet, for XDP and TC alike.
 * Bounds are checked against data_end before every access (the verifier insists).
 */
#ifndef AGGBOX_PARSE_H
#define AGGBOX_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#include "aggbox.h"

/* Hide a value from clang's range reasoning, so that a bounds check or mask written for
 * the verifier is not optimized away (clang proves it redundant; the verifier cannot). */
#define barrier_var(v) asm volatile("" : "+r"(v))

/* Offsets of an AggBox packet (IPv4 without options, which parse_udp refuses). */
#define ETH_OFF   0
#define IP_OFF    (sizeof(struct ethhdr))
#define UDP_OFF   (IP_OFF + sizeof(struct iphdr))
#define HDR_OFF   (UDP_OFF + sizeof(struct udphdr))
#define PAYLOAD_OFF (HDR_OFF + sizeof(struct aggbox_hdr))

struct pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct udphdr *udp;
	struct aggbox_hdr *hdr; /* NULL when the packet is too short for one */
};

enum parse_result {
	PARSE_NOT_OURS = 0,  /* not IPv4/UDP to an AggBox port: leave it alone */
	PARSE_OK,
	PARSE_TRUNCATED,
	PARSE_IP_OPTIONS,
};

/* Parse Ethernet/IPv4/UDP; PARSE_OK when the UDP destination port is in [port_lo, port_hi]
 * and a whole aggbox_hdr follows. */
static __always_inline int parse_aggbox(void *data, void *data_end, struct pkt *p,
					__u16 port_lo, __u16 port_hi)
{
	p->eth = data;
	if ((void *)(p->eth + 1) > data_end || p->eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_OURS;
	p->ip = (void *)(p->eth + 1);
	if ((void *)(p->ip + 1) > data_end || p->ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	if (p->ip->ihl != 5) {
		/* Options move the UDP header: read the port where it really is, so that an
		 * AggBox packet with options is counted and dropped instead of slipping past
		 * every check into the stack (and a member's socket). */
		__u32 ihl = p->ip->ihl * 4;
		struct udphdr *u = (void *)p->ip + ihl;
		if (ihl < sizeof(struct iphdr) || (void *)(u + 1) > data_end)
			return PARSE_NOT_OURS;
		__u16 port = bpf_ntohs(u->dest);
		return port < port_lo || port > port_hi ? PARSE_NOT_OURS : PARSE_IP_OPTIONS;
	}
	p->udp = (void *)(p->ip + 1);
	if ((void *)(p->udp + 1) > data_end)
		return PARSE_NOT_OURS;
	__u16 dport = bpf_ntohs(p->udp->dest);
	if (dport < port_lo || dport > port_hi)
		return PARSE_NOT_OURS;
	/* Ours by port from here on: anything odd is counted and dropped. */
	if (p->ip->ihl != 5 || (p->ip->frag_off & bpf_htons(0x3fff)))
		return PARSE_IP_OPTIONS;
	p->hdr = (void *)(p->udp + 1);
	if ((void *)(p->hdr + 1) > data_end)
		return PARSE_TRUNCATED;
	return PARSE_OK;
}

/* The header's own checks, before any map is consulted. Returns a counter index or -1. */
static __always_inline int check_hdr(const struct aggbox_hdr *h)
{
	if (h->magic != AGGBOX_MAGIC)
		return CNT_DROP_BAD_MAGIC;
	if (h->version != AGGBOX_VERSION)
		return CNT_DROP_BAD_VERSION;
	if (h->type == 0 || h->type >= AGGBOX_TYPE_MAX)
		return CNT_DROP_BAD_TYPE;
	return -1;
}

#endif /* AGGBOX_PARSE_H */
