/* SPDX-License-Identifier: Apache-2.0
 *
 * broadcast.c: in-kernel broadcast with stateless group acknowledgment.
 *
 * The packet's path, and the program that handles each step:
 *
 *   root app: ONE sendto(group_ip)            members                      root
 *   ------------------------------------      --------------------------  ---------------------
 *   tc_egress    fan-out: a copy per member  tc_ingress  record seq in the  xdp_ingress  fold
 *                (rewrite MAC/IP, fix         window, clone a copy to own  every member's ACK;
 *                checksums, clone_redirect)   egress; original goes up     pass ONE group-ACK up
 *                                             tc_egress  turn the copy      when all have it
 *                                             into a cumulative ACK
 *
 * What an ACK promises: the member's KERNEL received, at its TC ingress hook, a DATA packet
 * that passed every check below, and every seq <= ack.aux of that sender. It does not
 * promise the application read it: UDP may still drop it (bad checksum, full buffer), in
 * which case the member application sees a gap in seq and sends a NACK (see
 * aggbox/collectives/broadcast.py). The root therefore keeps sent packets for NACKs.
 *
 * Every host loads all three programs: any member may be a root.
 * TC verdicts: TC_ACT_UNSPEC for packets that are not ours, so that other program
 * families attached to the same clsact hook (at other priorities) still see them.
 * State is reset by user space when a job is installed (aggbox/collectives/broadcast.py,
 * BroadcastPrograms.install_job): the fold and window slots of that job are zeroed.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#define JOB_SLOTS AGGBOX_MAX_JOBS /* broadcast state is small: every job slot the host has */

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/check.h"
#include "lib/csum.h"
#include "lib/reply.h"

/* ---------------------------------------------------------------- maps -------------- */

/* `config` (ports) and `members` (key: job slot * AGGBOX_MAX_MEMBERS + rank): lib/check.h */

struct bcast_job {
	AGGBOX_JOB_PREFIX;
	__u32 group_ip;  /* network order: the destination the root's one send goes to */
	__u32 pad;
};
BPF_HASH(jobs, __u32, struct bcast_job, JOB_SLOTS);

/* Root side: the highest cumulative ACK from each member, and the group's. */
struct ack_fold {
	__u64 group_acked;
	__u64 acked[AGGBOX_MAX_MEMBERS];
	__u64 sent_max; /* the highest seq the fan-out sent: no ACK may claim more */
};
BPF_ARRAY(fold, struct ack_fold, JOB_SLOTS);

/* Member side, per (job slot, sender rank): every seq <= cum arrived; bit i of `seen`
 * says seq cum + 1 + i arrived (out of order). */
struct rx_window {
	struct bpf_spin_lock lock;
	__u32 cum;
	__u64 seen;
};
BPF_ARRAY(rx, struct rx_window, JOB_SLOTS * AGGBOX_MAX_MEMBERS);

#define WINDOW_BITS 64

/* ---------------------------------------------------------------- parse and check --- */

static __always_inline struct bcast_job *find_job(const struct aggbox_hdr *hdr)
{
	__u32 job_id = hdr->job_id;
	return jobs.lookup(&job_id);
}

/* The checks every AggBox packet passes before it may touch state (lib/check.h). */
static __always_inline struct bcast_job *check_member_packet(struct pkt *p, int *reason)
{
	return (void *)check_sender(p, find_job(p->hdr), ANY_TYPE, SELF_NEVER_SENDS, reason);
}

/* Is the packet's destination address this host's own (as the job's members map says)?
 * Only then may its kernel acknowledge it. */
static __always_inline int addressed_to_me(struct pkt *p, struct bcast_job *job)
{
	__u32 key = member_key((void *)job, job->my_rank);
	struct member_addr *me = members.lookup(&key);
	return me && me->ip == p->ip->daddr;
}

/* ---------------------------------------------------------------- act --------------- */

/* Raise *slot to v unless it is already >= v. Returns 1 if this call raised it. */
static __always_inline int raise_to(__u64 *slot, __u64 v)
{
#pragma clang loop unroll(disable)
	for (int i = 0; i < 8; i++) {
		__u64 old = *slot;
		if (v <= old)
			return 0;
		if (__sync_val_compare_and_swap(slot, old, v) == old)
			return 1;
	}
	return 0;
}

/* Root: turn the root's one DATA packet to the group address into one copy per member;
 * the original is consumed. */
static __always_inline int fan_out(struct __sk_buff *skb, struct bcast_job *job, __u32 cur_ip,
				   __u32 seq)
{
	/* Before any copy leaves: an ACK for seq may come back at once. */
	__u32 slot = job->slot;
	struct ack_fold *st = fold.lookup(&slot);
	if (!st)
		return TC_ACT_SHOT;
	raise_to(&st->sent_max, seq);
	skb->mark = AGGBOX_MARK_FANOUT; /* the clones re-enter tc_egress: let them pass */
	clone_to_members(skb, (void *)job, cur_ip, job->my_rank);
	count(CNT_ACCEPTED);
	/* STOLEN, not SHOT: the original was delivered as copies, not dropped. */
	return TC_ACT_STOLEN;
}

/* Member: does a UDP socket in this namespace take the packet (its destination port)? */
static __always_inline int socket_bound(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = p->ip->saddr;
	t.ipv4.daddr = p->ip->daddr;
	t.ipv4.sport = p->udp->source;
	t.ipv4.dport = p->udp->dest;
	struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Member: record seq from sender `rank` in the member's window. Returns the counter
 * describing what happened (accepted, duplicate, out of window). */
static __always_inline int record_seq(struct rx_window *w, __u32 seq)
{
	int result = CNT_ACCEPTED;
	bpf_spin_lock(&w->lock);
	__u32 cum = w->cum;
	if (seq <= cum) {
		result = CNT_DATA_DUPLICATE;
	} else if (seq - cum > WINDOW_BITS) {
		result = CNT_DATA_OUT_OF_WINDOW;
	} else {
		__u64 seen = w->seen | (1ULL << (seq - cum - 1));
#pragma clang loop unroll(disable)
		for (int i = 0; i < WINDOW_BITS; i++) {
			if (!(seen & 1))
				break;
			seen >>= 1;
			cum++;
		}
		w->seen = seen;
		w->cum = cum;
	}
	bpf_spin_unlock(&w->lock);
	return result;
}

/* Member: the clone made by tc_ingress reaches the member's egress: shrink it to a bare
 * header and send it back to the root as a cumulative ACK. */
static __always_inline int build_ack(struct __sk_buff *skb, struct port_config *cfg)
{
	skb->mark = 0;
	struct pkt p = {};
	if (parse_aggbox((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
			 cfg->port_lo, cfg->port_hi) != PARSE_OK)
		goto err;
	struct bcast_job *job = find_job(p.hdr);
	if (!job || p.hdr->rank >= AGGBOX_MAX_MEMBERS)
		goto err;
	__u32 key = member_key((void *)job, p.hdr->rank);
	struct rx_window *w = rx.lookup(&key);
	if (!w)
		goto err;
	if (reply_header(skb, AGGBOX_ACK, job->my_rank, w->cum) != 0)
		goto err;
	count(CNT_ACK_SENT);
	return TC_ACT_OK;
err:
	count(CNT_ACK_ERRORS);
	return TC_ACT_SHOT;
}

/* Root: the slowest member's cumulative ACK. */
static __always_inline __u64 slowest_member(struct ack_fold *st, struct bcast_job *job)
{
	__u64 min = ~0ULL;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < AGGBOX_MAX_MEMBERS; i++) {
		if (i >= job->n_members)
			break;
		if (i == job->my_rank)
			continue;
		__u64 v = st->acked[i];
		if (v < min)
			min = v;
	}
	return min;
}

/* ---------------------------------------------------------------- entry points ------ */

/* Member: check, record and acknowledge DATA. */
int tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int found = find_header((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
				0);
	if (found != FIND_OK)
		return found == FIND_NOT_OURS ? TC_ACT_UNSPEC : TC_ACT_SHOT;
	/* A frame for another host's MAC (flooded by a switch) is none of our business; but a
	 * broadcast- or multicast-MAC frame reaches this host's stack: it is checked like any
	 * other (and then dropped: the fan-out sends every copy to its member's own MAC). */
	if (skb->pkt_type == PACKET_OTHERHOST)
		return TC_ACT_UNSPEC;
	/* A header bad in itself (magic, version, type) is dropped whatever its type: a
	 * member has no XDP program that would have vetted it first. */
	int bad = check_hdr(p.hdr);
	if (bad >= 0) {
		count(bad);
		return TC_ACT_SHOT;
	}
	/* XDP (on a root) already vetted ACK / NACK / GROUP_ACK: only DATA is ours here. */
	if (p.hdr->type != AGGBOX_DATA)
		return TC_ACT_OK;
	int reason = 0;
	struct bcast_job *job = check_member_packet(&p, &reason);
	if (!job) {
		count(reason);
		return TC_ACT_SHOT;
	}
	if (skb->pkt_type != PACKET_HOST || !addressed_to_me(&p, job)) {
		count(CNT_DROP_NOT_MINE);
		return TC_ACT_SHOT;
	}
	if (!payload_fits(skb->len, &p, p.hdr->count)) {
		count(CNT_DROP_TRUNCATED);
		return TC_ACT_SHOT;
	}
	/* Acknowledged here, before the stack verifies anything: a corrupted copy must not
	 * move the window (the root would never resend what the socket then drops).
	 * AGGBOX_NO_RX_CSUM: for measuring this check's cost only (docs/kernel.md). */
#ifndef AGGBOX_NO_RX_CSUM
	if (!ip_csum_ok(p.ip, (void *)(long)skb->data_end) ||
	    !udp_csum_ok(skb, p.ip, p.udp, UDP_OFF)) {
		count(CNT_DROP_BAD_CSUM);
		return TC_ACT_SHOT;
	}
#endif
	/* The kernel ACKs on the application's behalf only while the application is there:
	 * a member whose process died (its socket gone) must not tell the root it has data
	 * nobody will read. The stack then drops the packet (port unreachable). */
	if (!socket_bound(skb, &p)) {
		count(CNT_DATA_NO_SOCKET);
		return TC_ACT_OK;
	}
	__u32 key = member_key((void *)job, p.hdr->rank);
	struct rx_window *w = rx.lookup(&key);
	if (!w)
		return TC_ACT_SHOT;
	count(record_seq(w, p.hdr->seq));
	/* ACK duplicates too: the earlier ACK may have been lost. Out-of-window packets also
	 * get an ACK (of the unchanged cumulative value), which tells the root where we are. */
	__u32 saved_mark = skb->mark;
	skb->mark = AGGBOX_MARK_ACK;
	if (bpf_clone_redirect(skb, skb->ifindex, 0) != 0)
		count(CNT_ACK_ERRORS);
	skb->mark = saved_mark;
	return TC_ACT_OK;
}

/* Root: fan the one DATA to the group out; member: turn tc_ingress's clone into an ACK. */
int tc_egress(struct __sk_buff *skb)
{
	if (skb->mark == AGGBOX_MARK_FANOUT)
		return TC_ACT_OK; /* one of our own copies on its way out */
	struct port_config *cfg = get_config();
	if (!cfg)
		return TC_ACT_UNSPEC;
	if (skb->mark == AGGBOX_MARK_ACK)
		return build_ack(skb, cfg);

	struct pkt p = {};
	if (parse_aggbox((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
			 cfg->port_lo, cfg->port_hi) != PARSE_OK)
		return TC_ACT_UNSPEC; /* not AggBox broadcast traffic: the next filter decides */
	if (p.hdr->magic != AGGBOX_MAGIC || p.hdr->type != AGGBOX_DATA)
		return TC_ACT_OK;
	struct bcast_job *job = find_job(p.hdr);
	if (!job || p.ip->daddr != job->group_ip)
		return TC_ACT_OK; /* unicast DATA (a retransmission) goes out as it is */
	return fan_out(skb, job, p.ip->daddr, p.hdr->seq);
}

/* Root: fold every member's ACK; pass ONE group-ACK up when all have a seq. */
int xdp_ingress(struct xdp_md *ctx)
{
	struct pkt p = {};
	int found = find_header((void *)(long)ctx->data, (void *)(long)ctx->data_end, &p,
				0);
	if (found != FIND_OK)
		return found == FIND_NOT_OURS ? XDP_PASS : XDP_DROP;
	__u8 type = p.hdr->type;
	if (type == AGGBOX_DATA)
		return XDP_PASS; /* tc_ingress checks and acknowledges it */
	int reason = 0;
	struct bcast_job *job = check_member_packet(&p, &reason);
	if (!job) {
		count(reason);
		return XDP_DROP;
	}
	if (type == AGGBOX_NACK) {
		count(CNT_NACK);
		return XDP_PASS;
	}
	if (type != AGGBOX_ACK) {
		count(CNT_DROP_BAD_TYPE); /* nobody but this program makes GROUP_ACKs */
		return XDP_DROP;
	}
	__u32 slot = job->slot;
	struct ack_fold *st = fold.lookup(&slot);
	if (!st)
		return XDP_DROP;
	__u32 rank = p.hdr->rank & (AGGBOX_MAX_MEMBERS - 1); /* < n_members, checked above */
	/* Never fold beyond what the fan-out sent: an ACK for seqs never sent (forged, or a
	 * stale job's) would pin the fold and silently turn reliability off. */
	if (p.hdr->aux > st->sent_max) {
		count(CNT_ACK_BEYOND_SENT);
		return XDP_DROP;
	}
	if (!raise_to(&st->acked[rank], p.hdr->aux)) {
		count(CNT_ACK_STALE);
		return XDP_DROP;
	}
	__u64 group = slowest_member(st, job);
	if (!raise_to(&st->group_acked, group)) {
		count(CNT_ACK_FOLDED);
		return XDP_DROP;
	}
	p.hdr->type = AGGBOX_GROUP_ACK;
	p.hdr->aux = group;
	p.udp->check = 0; /* XDP: the skb the stack builds is CHECKSUM_NONE, and 0 is "none" */
	count(CNT_GROUP_ACK);
	return XDP_PASS;
}
