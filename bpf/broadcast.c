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
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/udp.h>

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/csum.h"

struct bcast_config {
	__u16 port_lo; /* AggBox jobs on this host use UDP ports port_lo..port_hi */
	__u16 port_hi;
	__u32 pad;
};
BPF_ARRAY(config, struct bcast_config, 1);

struct bcast_job {
	__u32 token;
	__u32 slot;      /* index of this job in the per-job arrays below */
	__u32 n_members; /* ranks 0 .. n_members - 1 */
	__u32 my_rank;   /* this host's rank in the job */
	__u32 group_ip;  /* network order: the destination the root's one send goes to */
	__u32 pad;
};
BPF_HASH(jobs, __u32, struct bcast_job, AGGBOX_MAX_JOBS);

struct bcast_member {
	__u32 ip;    /* network order */
	__u8 mac[6];
	__u16 pad;
};
/* key: slot * AGGBOX_MAX_MEMBERS + rank */
BPF_ARRAY(members, struct bcast_member, AGGBOX_MAX_JOBS * AGGBOX_MAX_MEMBERS);

/* Root side: the highest cumulative ACK from each member, and the group's. */
struct ack_fold {
	__u64 group_acked;
	__u64 acked[AGGBOX_MAX_MEMBERS];
	__u64 sent_max; /* the highest seq the fan-out sent: no ACK may claim more */
};
BPF_ARRAY(fold, struct ack_fold, AGGBOX_MAX_JOBS);

/* Member side, per (job slot, sender rank): every seq <= cum arrived; bit i of `seen`
 * says seq cum + 1 + i arrived (out of order). */
struct rx_window {
	struct bpf_spin_lock lock;
	__u32 cum;
	__u64 seen;
};
BPF_ARRAY(rx, struct rx_window, AGGBOX_MAX_JOBS * AGGBOX_MAX_MEMBERS);

#define WINDOW_BITS 64

static __always_inline struct bcast_config *get_config(void)
{
	__u32 zero = 0;
	return config.lookup(&zero);
}

/* Find the AggBox header of a packet to one of this host's AggBox ports.
 * Returns 1 when found whole, 0 when the packet is not ours (leave it alone: other ports,
 * and UDP to our ports without AggBox's magic, counted), and -1 when it is ours but
 * malformed (counted here; the caller drops it). */
static __always_inline int find_header(void *data, void *data_end, struct pkt *p)
{
	struct bcast_config *cfg = get_config();
	if (!cfg)
		return 0;
	int r = parse_aggbox_magic(data, data_end, p, cfg->port_lo, cfg->port_hi);
	if (r == PARSE_NOT_OURS)
		return 0;
	if (r == PARSE_FOREIGN) {
		count(CNT_PASSED_NOT_OURS);
		return 0;
	}
	if (r != PARSE_OK) {
		count(r == PARSE_TRUNCATED ? CNT_DROP_TRUNCATED : CNT_DROP_IP_OPTIONS);
		return -1;
	}
	return 1;
}

/* The checks every AggBox packet passes before it may touch state. On success returns
 * the job and leaves *reason untouched; on failure returns NULL and sets *reason. */
static __always_inline struct bcast_job *check_member_packet(struct pkt *p, int *reason)
{
	int bad = check_hdr(p->hdr);
	if (bad >= 0) {
		*reason = bad;
		return NULL;
	}
	__u32 job_id = p->hdr->job_id;
	struct bcast_job *job = jobs.lookup(&job_id);
	if (!job) {
		*reason = CNT_DROP_UNKNOWN_JOB;
		return NULL;
	}
	if (p->hdr->token != job->token) {
		*reason = CNT_DROP_BAD_TOKEN;
		return NULL;
	}
	__u32 rank = p->hdr->rank;
	if (rank >= job->n_members || rank >= AGGBOX_MAX_MEMBERS || rank == job->my_rank) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	__u32 key = job->slot * AGGBOX_MAX_MEMBERS + rank;
	struct bcast_member *m = members.lookup(&key);
	if (!m || m->ip != p->ip->saddr) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	/* The member's IP from another MAC: someone on the bridge spoofing it. */
	if (!mac_matches(m->mac, p->eth)) {
		*reason = CNT_DROP_WRONG_MAC;
		return NULL;
	}
	return job;
}

/* Is the packet's destination address this host's own (as the job's members map says)?
 * Only then may its kernel acknowledge it. */
static __always_inline int addressed_to_me(struct pkt *p, struct bcast_job *job)
{
	__u32 key = job->slot * AGGBOX_MAX_MEMBERS + job->my_rank;
	struct bcast_member *me = members.lookup(&key);
	return me && me->ip == p->ip->daddr;
}

/* ---------------------------------------------------------------- root: fan-out ---- */

/* Turn the root's one DATA packet to the group address into one copy per member. The
 * packet is rewritten in place before each clone; the original is consumed at the end. */
static __always_inline int raise_to(__u64 *slot, __u64 v);

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
	__u32 copies = 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < AGGBOX_MAX_MEMBERS; i++) {
		if (i >= job->n_members)
			break;
		if (i == job->my_rank)
			continue;
		__u32 key = job->slot * AGGBOX_MAX_MEMBERS + i;
		struct bcast_member *m = members.lookup(&key);
		if (!m)
			break;
		__u32 new_ip = m->ip;
		/* Pseudo-header first (it includes daddr), then the IP header checksum. */
		bpf_l4_csum_replace(skb, UDP_OFF + offsetof(struct udphdr, check), cur_ip, new_ip,
				    BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_ip));
		bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), cur_ip, new_ip,
				    sizeof(new_ip));
		bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, daddr), &new_ip,
				    sizeof(new_ip), 0);
		bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), m->mac, ETH_ALEN, 0);
		cur_ip = new_ip;
		if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
			copies++;
		else
			count(CNT_FANOUT_ERRORS);
	}
	__u32 idx = CNT_FANOUT_COPIES;
	__u64 *c = counters.lookup(&idx);
	if (c)
		*c += copies;
	count(CNT_ACCEPTED);
	/* STOLEN, not SHOT: the original was delivered as copies, not dropped. */
	return TC_ACT_STOLEN;
}

/* ---------------------------------------------------------------- member: ACK ------- */

/* Record seq from sender `rank` in the member's window. Returns the counter describing
 * what happened (accepted, duplicate, out of window). */
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

int tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int found = find_header((void *)(long)skb->data, (void *)(long)skb->data_end, &p);
	if (found <= 0)
		return found == 0 ? TC_ACT_UNSPEC : TC_ACT_SHOT;
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
	__u32 need = PAYLOAD_OFF + p.hdr->count;
	if (skb->len < need || bpf_ntohs(p.udp->len) < need - UDP_OFF) {
		count(CNT_DROP_TRUNCATED);
		return TC_ACT_SHOT;
	}
	/* Acknowledged here, before the stack verifies anything: a corrupted copy must not
	 * move the window (the root would never resend what the socket then drops). */
	if (!ip_csum_ok(p.ip, (void *)(long)skb->data_end) ||
	    !udp_csum_ok(skb, p.ip, p.udp, UDP_OFF)) {
		count(CNT_DROP_BAD_CSUM);
		return TC_ACT_SHOT;
	}
	__u32 key = job->slot * AGGBOX_MAX_MEMBERS + p.hdr->rank;
	__u32 seq = p.hdr->seq;
	struct rx_window *w = rx.lookup(&key);
	if (!w)
		return TC_ACT_SHOT;
	int result = record_seq(w, seq);
	count(result);
	/* ACK duplicates too: the earlier ACK may have been lost. Out-of-window packets also
	 * get an ACK (of the unchanged cumulative value), which tells the root where we are. */
	__u32 saved_mark = skb->mark;
	skb->mark = AGGBOX_MARK_ACK;
	if (bpf_clone_redirect(skb, skb->ifindex, 0) != 0)
		count(CNT_ACK_ERRORS);
	skb->mark = saved_mark;
	return TC_ACT_OK;
}

/* The clone made by tc_ingress reaches the member's egress: shrink it to a bare header
 * and send it back to the root as a cumulative ACK. */
static __always_inline int build_ack(struct __sk_buff *skb, struct bcast_config *cfg)
{
	skb->mark = 0;
	if (bpf_skb_change_tail(skb, PAYLOAD_OFF, 0) != 0)
		goto err;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = {};
	if (parse_aggbox(data, data_end, &p, cfg->port_lo, cfg->port_hi) != PARSE_OK)
		goto err;
	__u32 job_id = p.hdr->job_id;
	struct bcast_job *job = jobs.lookup(&job_id);
	if (!job || p.hdr->rank >= AGGBOX_MAX_MEMBERS)
		goto err;
	__u32 key = job->slot * AGGBOX_MAX_MEMBERS + p.hdr->rank;
	struct rx_window *w = rx.lookup(&key);
	if (!w)
		goto err;

	/* Swap addresses: the IP checksum is a sum, so swapping leaves it unchanged. */
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, p.eth->h_source, ETH_ALEN);
	__builtin_memcpy(p.eth->h_source, p.eth->h_dest, ETH_ALEN);
	__builtin_memcpy(p.eth->h_dest, mac, ETH_ALEN);
	__u32 ip = p.ip->saddr;
	p.ip->saddr = p.ip->daddr;
	p.ip->daddr = ip;
	__u16 port = p.udp->source;
	p.udp->source = p.udp->dest;
	p.udp->dest = port;

	__u16 old_len = p.ip->tot_len;
	__u16 new_len = bpf_htons(PAYLOAD_OFF - IP_OFF);
	p.ip->tot_len = new_len;
	p.udp->len = bpf_htons(PAYLOAD_OFF - UDP_OFF);
	p.udp->check = 0; /* IPv4 allows no UDP checksum; the root's XDP edits this packet */

	p.hdr->type = AGGBOX_ACK;
	p.hdr->flags = 0;
	p.hdr->rank = job->my_rank;
	p.hdr->count = 0;
	p.hdr->aux = w->cum;
	/* Last, because the helper invalidates packet pointers. */
	bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), old_len, new_len, 2);
	count(CNT_ACK_SENT);
	return TC_ACT_OK;
err:
	count(CNT_ACK_ERRORS);
	return TC_ACT_SHOT;
}

int tc_egress(struct __sk_buff *skb)
{
	if (skb->mark == AGGBOX_MARK_FANOUT)
		return TC_ACT_OK; /* one of our own copies on its way out */
	struct bcast_config *cfg = get_config();
	if (!cfg)
		return TC_ACT_UNSPEC;
	if (skb->mark == AGGBOX_MARK_ACK)
		return build_ack(skb, cfg);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = {};
	if (parse_aggbox(data, data_end, &p, cfg->port_lo, cfg->port_hi) != PARSE_OK)
		return TC_ACT_UNSPEC; /* not AggBox broadcast traffic: the next filter decides */
	if (p.hdr->magic != AGGBOX_MAGIC || p.hdr->type != AGGBOX_DATA)
		return TC_ACT_OK;
	__u32 job_id = p.hdr->job_id;
	struct bcast_job *job = jobs.lookup(&job_id);
	if (!job || p.ip->daddr != job->group_ip)
		return TC_ACT_OK; /* unicast DATA (a retransmission) goes out as it is */
	return fan_out(skb, job, p.ip->daddr, p.hdr->seq);
}

/* ---------------------------------------------------------------- root: fold -------- */

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

int xdp_ingress(struct xdp_md *ctx)
{
	struct pkt p = {};
	int found = find_header((void *)(long)ctx->data, (void *)(long)ctx->data_end, &p);
	if (found <= 0)
		return found == 0 ? XDP_PASS : XDP_DROP;
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
	p.udp->check = 0;
	count(CNT_GROUP_ACK);
	return XDP_PASS;
}
