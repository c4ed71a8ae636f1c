/* SPDX-License-Identifier: Apache-2.0
 *
 * impair.c: seeded packet loss, duplication and reordering for testbed links.
 *
 * Why not tc netem: the kernels this project runs on (6.18 here) are built without
 * CONFIG_NET_SCH_NETEM ("Error: Specified qdisc kind is unknown."), and without sch_fq, so
 * neither netem nor EDT delays exist. This program gives the impairments the tests need on
 * any kernel with TC BPF. It is attached in the testbed's switch namespace to both hooks of
 * each host's switch-side veth, so both directions of every link are impaired.
 *
 * - loss: drop with probability loss_ppm / 1e6;
 * - burst loss (Gilbert-Elliott): each link and direction is in a GOOD or BAD state; before
 *   each packet a GOOD link turns BAD with probability burst_enter_ppm / 1e6 and a BAD one
 *   turns GOOD with burst_leave_ppm / 1e6; in the BAD state a packet is dropped with
 *   burst_loss_ppm / 1e6. Losses then come in runs (mean BAD sojourn 1 / leave packets),
 *   which uniform loss never produces: a protocol whose repair assumes independent losses
 *   (one NACK, one retransmission round) is caught by it. Independent of `loss`, which
 *   still applies in both states;
 * - duplicate: send an extra copy (clone_redirect to the same hook, marked so the copy is
 *   not impaired again);
 * - reorder: hold one UDP packet back and release it right AFTER the next UDP packet on the
 *   same link (the next one goes first as a clone; the held bytes then replace the
 *   original's). A held packet with no follower is never released: it counts as a loss.
 *
 * TCP to or from the ports in `exempt_tcp` (the workloads' untimed control channels: their
 * barriers and "delivered" reports, not the collectives under test) passes unimpaired: at
 * 20% loss per link a TCP control message is lost six times in a row a few times per
 * hundred, and Linux's exponential RTO back-off then stalls the harness for 10+ s, which
 * showed up as a collective's failure it was not.
 *
 * Randomness is an xorshift64 generator per link and direction, seeded from user space, so
 * a run with the same seed and the same packet order makes the same decisions.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>

/* Not from <uapi/linux/in.h> and <uapi/linux/tcp.h>: with Debian's 6.1 headers both
 * include the kernel-internal <linux/socket.h>, about half a second of clang (docs/kernel.md,
 * "Toolchain"). Of TCP's 20-byte header only the ports are read. */
#ifndef IPPROTO_UDP /* <uapi/linux/in.h> came first (it defines both) */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#endif
struct tcp_ports {
	__be16 source;
	__be16 dest;
	__u8 rest[16]; /* seq, ack, flags, window, check, urg_ptr */
};

#define IMPAIR_MARK 0xab0c00ffu
#define STASH_MAX 1536 /* MTU 1500 + Ethernet header, rounded up */

struct impair_cfg {
	__u32 loss_ppm;
	__u32 duplicate_ppm;
	__u32 reorder_ppm;
	__u32 burst_enter_ppm; /* Gilbert-Elliott: GOOD -> BAD per packet; 0 = no burst loss */
	__u64 seed;
	__u32 burst_leave_ppm; /* BAD -> GOOD per packet */
	__u32 burst_loss_ppm;  /* drop probability in the BAD state */
	__u16 exempt_tcp[4];   /* TCP ports (either end) never impaired; 0 = unused */
};
BPF_ARRAY(impair_config, struct impair_cfg, 1);

enum stash_state { STASH_EMPTY = 0, STASH_BUSY = 1, STASH_FULL = 2 };

struct link_state {
	__u64 rng;
	__u64 stash_state; /* enum stash_state, changed with compare-and-swap */
	__u32 stash_len;
	__u32 bad; /* Gilbert-Elliott state: 1 = BAD */
	__u8 stash[STASH_MAX];
};
/* key: ifindex * 2 + (1 for egress, 0 for ingress) */
BPF_HASH(links, __u32, struct link_state, 1024);

/* IMP_BURST_LOST: dropped in the BAD state; IMP_BURSTS: GOOD -> BAD transitions;
 * IMP_BAD_SEEN: packets that met a BAD link (lost or not). */
enum impair_counter {
	IMP_LOST = 0, IMP_DUPLICATED, IMP_HELD, IMP_RELEASED,
	IMP_BURST_LOST, IMP_BURSTS, IMP_BAD_SEEN, IMP_MAX
};
BPF_PERCPU_ARRAY(impair_counters, __u64, IMP_MAX);

static __always_inline void bump(__u32 idx)
{
	__u64 *v = impair_counters.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline __u32 next_random(struct link_state *st)
{
	__u64 x = st->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	st->rng = x;
	return (__u32)(x >> 32);
}

static __always_inline int chance(struct link_state *st, __u32 ppm)
{
	return ppm && (next_random(st) % 1000000u) < ppm;
}

/* One Gilbert-Elliott step for this packet: move the link's state, then decide the loss.
 * Two CPUs may handle one link direction at once; as with `rng`, a racing update only
 * perturbs the random sequence (no lock on the per-packet path), never safety. */
static __always_inline int burst_lost(struct link_state *st, struct impair_cfg *cfg)
{
	if (!cfg->burst_enter_ppm)
		return 0;
	if (!st->bad) {
		if (chance(st, cfg->burst_enter_ppm)) {
			st->bad = 1;
			bump(IMP_BURSTS);
		}
	} else if (chance(st, cfg->burst_leave_ppm)) {
		st->bad = 0;
	}
	if (!st->bad)
		return 0;
	bump(IMP_BAD_SEEN);
	return chance(st, cfg->burst_loss_ppm);
}

static __always_inline int is_udp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return 0;
	return eth->h_proto == bpf_htons(ETH_P_IP) && ip->protocol == IPPROTO_UDP;
}

static __always_inline int exempt(struct __sk_buff *skb, struct impair_cfg *cfg)
{
	if (!cfg->exempt_tcp[0])
		return 0;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->protocol != IPPROTO_TCP || ip->ihl != 5)
		return 0;
	struct tcp_ports *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return 0;
	__u16 sport = bpf_ntohs(tcp->source), dport = bpf_ntohs(tcp->dest);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u16 port = cfg->exempt_tcp[i];
		if (port && (port == sport || port == dport))
			return 1;
	}
	return 0;
}

/* Hold this packet back. Returns 1 if held (the caller drops the original). */
static __always_inline int hold(struct __sk_buff *skb, struct link_state *st)
{
	__u32 len = skb->len & 0x7ff; /* masked so the verifier sees the bound */
	if (len > STASH_MAX || len < ETH_HLEN || len != skb->len)
		return 0;
	if (__sync_val_compare_and_swap(&st->stash_state, STASH_EMPTY, STASH_BUSY) != STASH_EMPTY)
		return 0;
	if (bpf_skb_load_bytes(skb, 0, st->stash, len) != 0) {
		st->stash_state = STASH_EMPTY;
		return 0;
	}
	st->stash_len = len;
	st->stash_state = STASH_FULL;
	bump(IMP_HELD);
	return 1;
}

/* Send this packet first (as a clone), then turn the original into the held one. */
static __always_inline int release_after(struct __sk_buff *skb, struct link_state *st,
					 __u64 flags)
{
	if (__sync_val_compare_and_swap(&st->stash_state, STASH_FULL, STASH_BUSY) != STASH_FULL)
		return TC_ACT_OK;
	__u32 len = st->stash_len & 0x7ff;
	if (len > STASH_MAX || len < ETH_HLEN) {
		st->stash_state = STASH_EMPTY;
		return TC_ACT_OK;
	}
	skb->mark = IMPAIR_MARK;
	bpf_clone_redirect(skb, skb->ifindex, flags);
	int ok = bpf_skb_change_tail(skb, len, 0) == 0 &&
		 bpf_skb_store_bytes(skb, 0, st->stash, len, 0) == 0;
	st->stash_state = STASH_EMPTY;
	if (!ok)
		return TC_ACT_SHOT; /* the follower went out as the clone; the held one is lost */
	bump(IMP_RELEASED);
	return TC_ACT_OK;
}

static __always_inline int impair(struct __sk_buff *skb, __u32 direction, __u64 redirect_flags)
{
	if (skb->mark == IMPAIR_MARK) {
		skb->mark = 0; /* our own copy re-entering this hook: impair it on the next link */
		return TC_ACT_OK;
	}
	__u32 zero = 0;
	struct impair_cfg *cfg = impair_config.lookup(&zero);
	if (!cfg)
		return TC_ACT_OK;
	__u32 key = skb->ifindex * 2 + direction;
	struct link_state *st = links.lookup(&key);
	if (!st || exempt(skb, cfg))
		return TC_ACT_OK;
	if (chance(st, cfg->loss_ppm)) {
		bump(IMP_LOST);
		return TC_ACT_SHOT;
	}
	if (burst_lost(st, cfg)) {
		bump(IMP_BURST_LOST);
		return TC_ACT_SHOT;
	}
	if (chance(st, cfg->duplicate_ppm)) {
		__u32 saved = skb->mark;
		skb->mark = IMPAIR_MARK;
		if (bpf_clone_redirect(skb, skb->ifindex, redirect_flags) == 0)
			bump(IMP_DUPLICATED);
		skb->mark = saved;
	}
	if (!cfg->reorder_ppm || !is_udp(skb))
		return TC_ACT_OK;
	if (st->stash_state == STASH_FULL)
		return release_after(skb, st, redirect_flags);
	if (chance(st, cfg->reorder_ppm) && hold(skb, st))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

int impair_ingress(struct __sk_buff *skb)
{
	return impair(skb, 0, BPF_F_INGRESS);
}

int impair_egress(struct __sk_buff *skb)
{
	return impair(skb, 1, 0);
}
