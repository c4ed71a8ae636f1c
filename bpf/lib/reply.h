/* SPDX-License-Identifier: Apache-2.0
 *
 * reply.h: turn a received packet into the kernel's answer to its sender (swap and
 * shrink) or into a copy for every member (fan-out), and leave a rewritten packet's UDP
 * checksum right whatever the skb's checksum mode. Include after check.h and csum.h.
 */
#ifndef AGGBOX_REPLY_H
#define AGGBOX_REPLY_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/check.h"
#include "lib/csum.h"

#define IP_CHECK_OFF  (IP_OFF + offsetof(struct iphdr, check))
#define UDP_CHECK_OFF (UDP_OFF + offsetof(struct udphdr, check))

/* Back to the sender: swap the Ethernet and IP addresses. Checksums are sums: a swap
 * leaves the IP header's and the UDP pseudo-header's valid. */
static __always_inline void swap_addresses(struct ethhdr *eth, struct iphdr *ip)
{
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__u32 addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
}

/* The UDP checksum of a packet this program rewrote, right in either checksum mode (a TC
 * program cannot read skb->ip_summed):
 * - CHECKSUM_PARTIAL (a local socket's packet with offload, crossing a veth or going to
 *   a NIC): the check field must hold the pseudo-header's sum; the NIC (or the stack's
 *   skb_checksum_help, when the device has no offload) adds the datagram's own sum.
 *   Zero there would leave the wire with a wrong checksum.
 * - otherwise the field holds the whole sum, and 0 (none, IPv4) is right.
 * bpf_l4_csum_replace of a pseudo-header diff onto a zeroed field writes the sum itself
 * in PARTIAL mode and its complement otherwise: reading it back tells the modes apart.
 * Invalidates packet pointers. Returns 0, or -1 when the packet is too short. */
static __always_inline int udp_csum_rewritten(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	struct udphdr *udp = data + UDP_OFF;
	if ((void *)(udp + 1) > data_end)
		return -1;
	__s64 s = pseudo_sum(ip, udp);
	if (s < 0)
		return -1;
	__u16 check = 0;
	bpf_skb_store_bytes(skb, UDP_CHECK_OFF, &check, 2, 0);
	bpf_l4_csum_replace(skb, UDP_CHECK_OFF, 0, (__u32)s, BPF_F_PSEUDO_HDR);
	if (bpf_skb_load_bytes(skb, UDP_CHECK_OFF, &check, 2) != 0)
		return -1;
	if (check != csum_fold_u64(s)) {
		check = 0; /* not PARTIAL: no checksum */
		bpf_skb_store_bytes(skb, UDP_CHECK_OFF, &check, 2, 0);
	}
	return 0;
}

/* Make the packet a bare AggBox header back to its sender: shrunk to the header,
 * addresses and ports swapped, lengths and checksums fixed; type, rank and aux as given,
 * flags and count 0 (job_id, token and seq stay). Returns 0, or -1 on failure. */
static __always_inline int reply_header(struct __sk_buff *skb, __u8 type, __u16 rank,
					__u32 aux)
{
	if (bpf_skb_change_tail(skb, PAYLOAD_OFF, 0) != 0)
		return -1;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	struct udphdr *udp = data + UDP_OFF;
	struct aggbox_hdr *hdr = data + HDR_OFF;
	if ((void *)(hdr + 1) > data_end)
		return -1;
	swap_addresses(data, ip);
	__u16 port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
	__u16 old_len = ip->tot_len;
	__u16 new_len = bpf_htons(PAYLOAD_OFF - IP_OFF);
	ip->tot_len = new_len;
	udp->len = bpf_htons(PAYLOAD_OFF - UDP_OFF);
	hdr->type = type;
	hdr->flags = 0;
	hdr->rank = rank;
	hdr->count = 0;
	hdr->aux = aux;
	/* Last: the helpers invalidate packet pointers. */
	bpf_l3_csum_replace(skb, IP_CHECK_OFF, old_len, new_len, 2);
	return udp_csum_rewritten(skb);
}

/* The k-th member but `skip`, without a branch on skip: k, or k + 1 from skip on. With
 * `if (i == skip) continue;` on a skip the verifier cannot know (broadcast's root rank),
 * it walked 440 k instructions of tc_egress for the loop below, against 9 k without the
 * branch (docs/kernel.md). */
static __always_inline __u32 nth_other(__u32 k, __u32 skip)
{
	__u64 d = (__u64)skip - k - 1; /* negative (bit 63 set) once k >= skip */
	barrier_var(d);                /* or clang turns it back into a compare and branch */
	return k + (__u32)(d >> 63);
}

/* Send a clone of the packet to every member of the job but rank `skip` (none: pass
 * AGGBOX_MAX_MEMBERS), each to its own MAC and IP: the packet is rewritten in place
 * before each clone (UDP pseudo-header first, it includes daddr; a zero UDP check stays
 * zero). `cur_ip`: the packet's destination now. Needs lib/check.h's `members`. Returns
 * the copies sent; the caller disposes of the original. */
static __always_inline __u32 clone_to_members(struct __sk_buff *skb,
					      const struct job_prefix *job, __u32 cur_ip,
					      __u32 skip)
{
	__u32 copies = 0;
#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (__u32 k = 0; k < AGGBOX_MAX_MEMBERS; k++) {
		__u32 i = nth_other(k, skip);
		if (i >= job->n_members)
			break;
		__u32 key = member_key(job, i);
		struct member_addr *m = members.lookup(&key);
		if (!m)
			break;
		__u32 new_ip = m->ip;
		bpf_l4_csum_replace(skb, UDP_CHECK_OFF, cur_ip, new_ip,
				    BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_ip));
		bpf_l3_csum_replace(skb, IP_CHECK_OFF, cur_ip, new_ip, sizeof(new_ip));
		bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, daddr), &new_ip,
				    sizeof(new_ip), 0);
		bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), m->mac, ETH_ALEN, 0);
		cur_ip = new_ip;
		if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
			copies++;
		else
			count(CNT_FANOUT_ERRORS);
	}
	count_n(CNT_FANOUT_COPIES, copies);
	return copies;
}

#endif /* AGGBOX_REPLY_H */
