/* SPDX-License-Identifier: Apache-2.0
 *
 * csum.h: verify a received packet's IPv4 header and UDP checksums in a TC program.
 *
 * Why: a TC ingress program acts on a packet (acknowledges it, adds its pairs) before the
 * stack has verified anything; the stack would drop a corrupted packet only later, at
 * the socket, when the ACK is gone and the sums are changed. Include after parse.h and
 * maps.h (it defines a per-CPU scratch map).
 *
 * CHECKSUM_PARTIAL: a packet from a local socket with checksum offload crosses a veth
 * with only the pseudo-header's sum in uh->check (the "NIC" never filled it in), and the
 * receiving stack trusts it. A TC program cannot read skb->ip_summed, so such a packet
 * is recognised by its check field equal to that pseudo-header sum; a corrupted packet
 * passes that way only if its corruption also produced exactly this value (1 in 65536).
 * UDP check 0 means "no checksum" in IPv4 (AggBox's own kernel-made ACKs send none).
 */
#ifndef AGGBOX_CSUM_H
#define AGGBOX_CSUM_H

#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "lib/parse.h"

#define CSUM_CHUNK 512 /* bpf_csum_diff sums at most 512 bytes per call */
#define CSUM_CHUNKS 4  /* UDP datagrams up to 2048 bytes: every AggBox packet at MTU 1500 */

struct csum_scratch_buf {
	__u8 b[CSUM_CHUNK + 4]; /* + 4: the zero padding of a last chunk not a multiple of 4 */
};
BPF_PERCPU_ARRAY(csum_scratch, struct csum_scratch_buf, 1);

static __always_inline __u16 csum_fold_u64(__s64 sum)
{
	__u64 s = (__u64)sum & 0xffffffffULL;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* The 20-byte IPv4 header (parse_aggbox refuses options) sums to 0xffff. */
static __always_inline int ip_csum_ok(struct iphdr *ip, void *data_end)
{
	if ((void *)(ip + 1) > data_end)
		return 0;
	__s64 s = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	return s >= 0 && csum_fold_u64(s) == 0xffff;
}

struct csum_pseudo {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/* The UDP pseudo-header's sum (unfolded; negative: the helper failed). */
static __always_inline __s64 pseudo_sum(const struct iphdr *ip, const struct udphdr *udp)
{
	struct csum_pseudo ph = {};
	ph.saddr = ip->saddr;
	ph.daddr = ip->daddr;
	ph.proto = IPPROTO_UDP;
	ph.len = udp->len;
	return bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
}

/* The UDP datagram (header and payload, from the packet itself, linear or not) plus the
 * pseudo-header sums to 0xffff; or its check is 0 (none) or the pseudo-header's sum
 * (CHECKSUM_PARTIAL, see above). ip and udp: pointers into the packet, checked by the
 * caller's parse (no helper that moves packet data may run between). */
static __always_inline int udp_csum_ok(struct __sk_buff *skb, struct iphdr *ip,
				       struct udphdr *udp, __u32 udp_off)
{
	__u16 check = udp->check;
	if (check == 0)
		return 1;
	__u32 left = bpf_ntohs(udp->len);
	__s64 s = pseudo_sum(ip, udp);
	if (s < 0)
		return 0;
	if (csum_fold_u64(s) == check)
		return 1; /* CHECKSUM_PARTIAL */
	if (left < sizeof(struct udphdr))
		return 0;
	/* Longer than every AggBox packet at MTU 1500 (a jumbo-MTU broadcast): not summed
	 * here, the socket still verifies it and the receiver NACKs what it drops. Pairs the
	 * reducer's kernel adds always fit (64 x 24 bytes). */
	if (left > CSUM_CHUNKS * CSUM_CHUNK)
		return 1;
	__u32 zero = 0;
	struct csum_scratch_buf *buf = csum_scratch.lookup(&zero);
	if (!buf)
		return 0;
	__u32 off = udp_off;
#pragma unroll
	for (int i = 0; i < CSUM_CHUNKS; i++) {
		if (left == 0)
			break;
		if (left > CSUM_CHUNK) {
			if (bpf_skb_load_bytes(skb, off, buf->b, CSUM_CHUNK) != 0)
				return 0;
			s = bpf_csum_diff(0, 0, (__be32 *)buf->b, CSUM_CHUNK, s);
			if (s < 0)
				return 0;
			off += CSUM_CHUNK;
			left -= CSUM_CHUNK;
			continue;
		}
		/* The last chunk, 1..CSUM_CHUNK bytes: n == left, written so that the verifier
		 * sees its bounds (clang, which knows left's range, would drop the mask). */
		__u32 last = left;
		barrier_var(last);
		__u32 n = ((last - 1) & (CSUM_CHUNK - 1)) + 1;
		__u32 word = (n - 1) & (CSUM_CHUNK - 4); /* the 4-byte word holding the last byte */
		*(__u32 *)(buf->b + word) = 0;           /* its bytes beyond n stay zero */
		if (bpf_skb_load_bytes(skb, off, buf->b, n) != 0)
			return 0;
		s = bpf_csum_diff(0, 0, (__be32 *)buf->b, word + 4, s);
		if (s < 0)
			return 0;
		left = 0;
	}
	return left == 0 && csum_fold_u64(s) == 0xffff;
}

#endif /* AGGBOX_CSUM_H */
