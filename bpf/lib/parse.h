/* SPDX-License-Identifier: Apache-2.0
 *
 * parse.h: find the AggBox header in a packet, for XDP and TC alike.
 * Bounds are checked against data_end before every access (the verifier insists).
 */
#ifndef AGGBOX_PARSE_H
#define AGGBOX_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "aggbox.h"

/* IP protocol numbers (IANA), here rather than from <uapi/linux/in.h>: with Debian's 6.1
 * headers that one includes the kernel-internal <linux/socket.h>, about half a second of
 * clang per family (docs/kernel.md, "Toolchain"). in.h included after this file would
 * clash with these macros (its enum); tests/unit/test_bpf_includes.py keeps it out. */
#ifndef IPPROTO_UDP /* <uapi/linux/in.h> came first (it defines both) */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#endif

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

/* What parse_aggbox_magic adds to enum parse_result. */
#define PARSE_FOREIGN 16 /* UDP to an AggBox port that is not AggBox's (no magic): pass it */

/* parse_aggbox, and then: a datagram to an AggBox port that does not begin with AggBox's
 * magic is somebody else's (the ports lie in Linux's ephemeral range: a DNS or NTP reply
 * may land there), PARSE_FOREIGN, for the caller to pass untouched. Non-first IPv4
 * fragments carry no UDP header of their own: foreign too (an AggBox packet is never
 * fragmented, and dropping its first fragment suffices to stop a fragmented forgery).
 * New helper rather than a change to parse_aggbox: aggregate.c keeps its semantics. */
static __always_inline int parse_aggbox_magic(void *data, void *data_end, struct pkt *p,
					      __u16 port_lo, __u16 port_hi)
{
	int r = parse_aggbox(data, data_end, p, port_lo, port_hi);
	if (r == PARSE_NOT_OURS)
		return r;
	if (r == PARSE_OK)
		return p->hdr->magic == AGGBOX_MAGIC ? PARSE_OK : PARSE_FOREIGN;
	if (!p->udp)
		return r; /* IP options: the port was read where it is; the caller drops it */
	if (p->ip->frag_off & bpf_htons(0x1fff))
		return PARSE_FOREIGN;
	__u32 *magic = (void *)(p->udp + 1);
	if ((void *)(magic + 1) > data_end || *magic != AGGBOX_MAGIC)
		return PARSE_FOREIGN;
	return r;
}

/* Is the frame's source MAC `want`? An all-zero `want` means unknown: anything passes. */
static __always_inline int mac_matches(const __u8 *want, const struct ethhdr *eth)
{
	__u32 hi = *(const __u32 *)want;
	__u16 lo = *(const __u16 *)(want + 4);
	if (hi == 0 && lo == 0)
		return 1;
	return hi == *(const __u32 *)eth->h_source && lo == *(const __u16 *)(eth->h_source + 4);
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
