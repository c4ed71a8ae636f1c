/* SPDX-License-Identifier: Apache-2.0
 *
 * aggregate.c: in-kernel aggregation ("the box"): workers' int32 blocks summed in a pool
 * of slots, the result sent to every worker from the kernel.
 *
 * The packet's path, on the aggregator's TC ingress:
 *
 *   agg_ingress  parse, check (magic, version, job, token, member, length), find the
 *                block's slot (seq mod pool) and copy (round parity); under the slot's
 *                lock, mark the worker in the contributor bitmap: a block already counted
 *                is never added twice (answered by agg_reply instead)
 *   agg_add      x N   adds AGG_CHUNK values per program, then tail-calls itself for the
 *                next chunk: a chain of ceil(count / AGG_CHUNK) programs, progress in a
 *                per-CPU map, so a block can be larger than one program may walk
 *   agg_finish   counts the worker as arrived; the LAST one turns its own packet into the
 *                result, resets the slot's other copy for the next round, and clones the
 *                result to every worker
 *   agg_reply    a duplicate of a finished block gets the finished copy's result (the
 *                worker lost it); of an unfinished block, a status naming who is missing
 *
 * Two copies per slot (SwitchML's shadow copy): round r of a slot uses copy r & 1. A
 * worker sends round r + 1 of a slot only after it has the result of round r, so when
 * round r completes every worker already has round r - 1's result and its copy can be
 * reset; the finished copy of round r stays intact until round r + 1 completes, which is
 * what answers late retransmissions. Only one user-space process per worker is involved;
 * the aggregator's user space only installs jobs (aggbox/collectives/allreduce.py).
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

#ifndef AGG_MAX_VALUES
#define AGG_MAX_VALUES 16384 /* largest block, in int32 values; a power of two */
#endif
#ifndef AGG_CHUNK
#define AGG_CHUNK 1024 /* values one program of the chain walks */
#endif
#ifndef AGG_POOL_SHIFT
#define AGG_POOL_SHIFT 6 /* 64 slots per job: a worker's window */
#endif
#ifndef AGG_MAX_JOBS
#define AGG_MAX_JOBS 4
#endif
#define AGG_POOL (1u << AGG_POOL_SHIFT)

_Static_assert((AGG_MAX_VALUES & (AGG_MAX_VALUES - 1)) == 0, "AGG_MAX_VALUES: power of 2");
_Static_assert(AGG_MAX_VALUES / AGG_CHUNK <= 30, "the chain would exceed the tail-call limit");

#define AGG_F_OP_MAX 0x0100 /* element-wise max instead of sum (scale agreement) */
#define AGG_F_ALIGN  0x0400 /* sum of values quantized with each worker's own exponent
			     * (hdr.scale_exp): the kernel aligns them to the largest */
#define AGG_MAX_CHUNKS (AGG_MAX_VALUES / AGG_CHUNK)
#define EXP_BIAS 1024 /* chunk_exp holds exponent + EXP_BIAS; 0 means no value yet */
#define AGG_F_STATUS 0x0200 /* AGG_RESULT that is a status: aux = contributors so far */

enum chain_index { CHAIN_ADD = 0, CHAIN_FINISH = 1, CHAIN_REPLY = 2, CHAIN_LEN };
/* user space fills `chain` with agg_add, agg_finish, agg_reply in this order */
BPF_PROG_ARRAY(chain, CHAIN_LEN);

struct agg_config {
	__u16 port_lo;
	__u16 port_hi;
	__u32 pad;
};
BPF_ARRAY(config, struct agg_config, 1);

struct agg_job {
	__u32 token;
	__u32 index;     /* this job's part of the slot and worker arrays */
	__u32 n_workers; /* ranks 0 .. n_workers - 1 */
	__u32 my_ip;     /* the aggregator's address (network order) */
	__u8 my_mac[6];
	__u16 pad;
};
BPF_HASH(jobs, __u32, struct agg_job, AGG_MAX_JOBS);

struct agg_worker {
	__u32 ip; /* network order */
	__u8 mac[6];
	__u16 pad;
};
/* key: job index * AGGBOX_MAX_MEMBERS + rank */
BPF_ARRAY(workers, struct agg_worker, AGG_MAX_JOBS * AGGBOX_MAX_MEMBERS);

struct agg_copy {
	struct bpf_spin_lock lock;
	__u32 round;        /* the round this copy holds */
	__u64 contributors; /* bit r: worker r's block is (being) added */
	__u32 arrived;      /* workers whose block is fully added */
	__u32 count;        /* values in the block */
	__u32 flags;        /* the first contributor's AGG_F_OP_MAX / AGG_F_ALIGN */
	__u32 pad;
	__s32 chunk_exp[AGG_MAX_CHUNKS]; /* AGG_F_ALIGN: the scale of each chunk's values */
	__s32 values[AGG_MAX_VALUES];
};
/* key: (job index * AGG_POOL + slot) * 2 + copy */
BPF_ARRAY(slots, struct agg_copy, AGG_MAX_JOBS * AGG_POOL * 2);

/* What one packet's chain carries from program to program (per CPU: a chain runs on one
 * CPU without interruption). */
struct agg_progress {
	__u32 job_id;
	__u32 key;       /* the slot copy */
	__u32 next;      /* the next value to add */
	__u32 count;
	__u32 flags;
	__u32 n_workers;
	__u32 complete;  /* agg_reply: the copy is finished (else: send a status) */
	__s32 exp;       /* AGG_F_ALIGN: the contribution's exponent */
	__u64 contributors;
};
BPF_PERCPU_ARRAY(progress, struct agg_progress, 1);

struct agg_chunk {
	__s32 v[AGG_CHUNK];
};
BPF_PERCPU_ARRAY(chunk_buf, struct agg_chunk, 1);

static __always_inline struct agg_progress *get_progress(void)
{
	__u32 zero = 0;
	return progress.lookup(&zero);
}

/* The header's and the job's checks. Returns the job, or NULL with *reason set. */
static __always_inline struct agg_job *check_block(struct __sk_buff *skb, struct pkt *p,
						   int *reason)
{
	int bad = check_hdr(p->hdr);
	if (bad >= 0) {
		*reason = bad;
		return NULL;
	}
	__u32 job_id = p->hdr->job_id;
	struct agg_job *job = jobs.lookup(&job_id);
	if (!job) {
		*reason = CNT_DROP_UNKNOWN_JOB;
		return NULL;
	}
	if (p->hdr->token != job->token) {
		*reason = CNT_DROP_BAD_TOKEN;
		return NULL;
	}
	__u32 rank = p->hdr->rank;
	if (rank >= job->n_workers || rank >= AGGBOX_MAX_MEMBERS) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	__u32 key = job->index * AGGBOX_MAX_MEMBERS + rank;
	struct agg_worker *w = workers.lookup(&key);
	if (!w || w->ip != p->ip->saddr) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	__u32 count = p->hdr->count;
	if (count == 0 || count > AGG_MAX_VALUES || skb->len < PAYLOAD_OFF + count * 4) {
		*reason = CNT_DROP_TRUNCATED;
		return NULL;
	}
	return job;
}

int agg_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct agg_config *cfg = config.lookup(&zero);
	if (!cfg)
		return TC_ACT_UNSPEC;
	/* A large block may arrive with only its network headers in the linear part of
	 * the skb: pull the AggBox header in (payload reads go through bpf_skb_load_bytes,
	 * which handles the rest wherever it lies). */
	if (skb->len >= PAYLOAD_OFF &&
	    (void *)(long)skb->data + PAYLOAD_OFF > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, PAYLOAD_OFF);
	struct pkt p = {};
	int r = parse_aggbox((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
			     cfg->port_lo, cfg->port_hi);
	if (r == PARSE_NOT_OURS || skb->pkt_type != PACKET_HOST)
		return TC_ACT_UNSPEC;
	if (r != PARSE_OK) {
		count(r == PARSE_TRUNCATED ? CNT_DROP_TRUNCATED : CNT_DROP_IP_OPTIONS);
		return TC_ACT_SHOT;
	}
	if (skb->gso_segs > 1) {
		count(CNT_DROP_GSO); /* several blocks in one skb: the sender must segment */
		return TC_ACT_SHOT;
	}
	int reason = 0;
	struct agg_job *job = check_block(skb, &p, &reason);
	if (!job) {
		count(reason);
		return TC_ACT_SHOT;
	}
	if (p.hdr->type != AGGBOX_AGG) {
		count(CNT_DROP_BAD_TYPE); /* only workers' blocks come to an aggregator */
		return TC_ACT_SHOT;
	}
	__u32 seq = p.hdr->seq;
	__u32 round = seq >> AGG_POOL_SHIFT;
	__u32 key = ((job->index * AGG_POOL) + (seq & (AGG_POOL - 1))) * 2 + (round & 1);
	__u64 bit = 1ULL << (p.hdr->rank & 63);
	__u32 n = p.hdr->count;
	__u32 flags = p.hdr->flags & (AGG_F_OP_MAX | AGG_F_ALIGN);
	struct agg_copy *cp = slots.lookup(&key);
	struct agg_progress *pr = get_progress();
	if (!cp || !pr)
		return TC_ACT_SHOT;

	int verdict = 0; /* 0: add, 1: stale round, 2: duplicate, 3: shape mismatch */
	bpf_spin_lock(&cp->lock);
	if (cp->round != round) {
		verdict = 1;
	} else if (cp->contributors & bit) {
		verdict = 2;
		pr->complete = cp->arrived == job->n_workers;
		pr->contributors = cp->contributors;
	} else if (cp->contributors && (cp->count != n || cp->flags != flags)) {
		verdict = 3;
	} else {
		if (!cp->contributors) {
			cp->count = n;
			cp->flags = flags;
		}
		cp->contributors |= bit;
	}
	bpf_spin_unlock(&cp->lock);

	pr->job_id = p.hdr->job_id;
	pr->key = key;
	pr->next = 0;
	pr->count = n;
	pr->flags = flags;
	pr->n_workers = job->n_workers;
	pr->exp = p.hdr->scale_exp;
	if (verdict == 1 || verdict == 3) {
		/* 3: its count or operation differs from the slot's other blocks */
		count(verdict == 1 ? CNT_AGG_STALE_ROUND : CNT_DROP_TRUNCATED);
		return TC_ACT_SHOT;
	}
	if (verdict == 2) {
		count(CNT_AGG_DUPLICATE);
		chain.call(skb, CHAIN_REPLY);
		return TC_ACT_SHOT;
	}
	count(CNT_ACCEPTED);
	chain.call(skb, CHAIN_ADD);
	return TC_ACT_SHOT; /* only if the chain is not installed */
}

/* x / 2**d rounded to nearest (d = 0: x unchanged; beyond 30 bits nothing is left). */
static __always_inline __s32 rshift_round(__s32 x, __u32 d)
{
	if (d == 0)
		return x;
	if (d > 30)
		return 0;
	return (x + (1 << (d - 1))) >> d;
}

int agg_add(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct agg_progress *pr = get_progress();
	struct agg_chunk *buf = chunk_buf.lookup(&zero);
	if (!pr || !buf)
		return TC_ACT_SHOT;
	__u32 key = pr->key;
	struct agg_copy *cp = slots.lookup(&key);
	if (!cp)
		return TC_ACT_SHOT;
	__u32 off = pr->next;
	__u32 n = pr->count - off;
	if (n > AGG_CHUNK)
		n = AGG_CHUNK;
	if (off >= AGG_MAX_VALUES || n == 0)
		return TC_ACT_SHOT;
	/* One helper call copies the chunk out of the packet (linear or not). The mask
	 * only restates n <= AGG_CHUNK in a form the verifier tracks. */
	__u32 len = n * 4;
	barrier_var(len);
	len &= AGG_CHUNK * 8 - 1;
	if (len < 4 || len > AGG_CHUNK * 4)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF + off * 4, buf->v, len) != 0)
		return TC_ACT_SHOT;
	/* Hidden from clang: it would otherwise drop `i < AGG_CHUNK` as implied by n, and the
	 * verifier, which cannot see that, walks the loop until it gives up. */
	barrier_var(n);
	bpf_spin_lock(&cp->lock);
	if (pr->flags & AGG_F_OP_MAX) {
#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
		for (__u32 i = 0; i < AGG_CHUNK; i++) {
			if (i >= n)
				break;
			__u32 j = i, idx = off + i;
			barrier_var(j); /* keep clang from turning indices into pointer walks */
			barrier_var(idx);
			j &= AGG_CHUNK - 1;
			idx &= AGG_MAX_VALUES - 1;
			if (buf->v[j] > cp->values[idx])
				cp->values[idx] = buf->v[j];
		}
	} else {
		/* AGG_F_ALIGN: bring the chunk and the contribution to the larger exponent
		 * (rounding right shifts; see aggbox/quant.py for the error this adds). */
		__u32 shift_sum = 0, shift_in = 0;
		if (pr->flags & AGG_F_ALIGN) {
			__u32 c = (off / AGG_CHUNK) & (AGG_MAX_CHUNKS - 1);
			__s32 mine = pr->exp + EXP_BIAS, cur = cp->chunk_exp[c];
			if (cur == 0 || mine > cur) {
				shift_sum = cur ? mine - cur : 0;
				cp->chunk_exp[c] = mine;
			} else {
				shift_in = cur - mine;
			}
		}
#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
		for (__u32 i = 0; i < AGG_CHUNK; i++) {
			if (i >= n)
				break;
			__u32 j = i, idx = off + i;
			barrier_var(j);
			barrier_var(idx);
			idx &= AGG_MAX_VALUES - 1;
			cp->values[idx] = rshift_round(cp->values[idx], shift_sum) +
					  rshift_round(buf->v[j & (AGG_CHUNK - 1)], shift_in);
		}
	}
	bpf_spin_unlock(&cp->lock);
	pr->next = off + n;
	if (pr->next < pr->count)
		chain.call(skb, CHAIN_ADD);
	else
		chain.call(skb, CHAIN_FINISH);
	return TC_ACT_SHOT;
}

/* Make the packet a result carrying `cp`'s values (same length as the block it was). */
static __always_inline int write_result(struct __sk_buff *skb, struct agg_copy *cp,
					__u32 n)
{
	__u32 len = n * 4;
	barrier_var(len);
	len &= AGG_MAX_VALUES * 8 - 1; /* restates the bound for the verifier */
	if (len < 4 || len > AGG_MAX_VALUES * 4)
		return -1;
	return bpf_skb_store_bytes(skb, PAYLOAD_OFF, cp->values, len, 0);
}

/* The result's exponent (AGG_F_ALIGN): every chunk ends at the group's largest. */
static __always_inline void set_scale(struct __sk_buff *skb, struct agg_copy *cp)
{
	__s16 e = cp->chunk_exp[0] - EXP_BIAS;
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, scale_exp), &e, 2, 0);
}

static __always_inline void set_type(struct __sk_buff *skb, __u8 type, __u16 flags, __u32 aux)
{
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, type), &type, 1, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, flags), &flags, 2, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, aux), &aux, 4, 0);
	__u16 no_csum = 0; /* IPv4 UDP without checksum: the payload was rewritten */
	bpf_skb_store_bytes(skb, UDP_OFF + offsetof(struct udphdr, check), &no_csum, 2, 0);
}

/* All zero: the source that resets a slot copy in one map update (no loop over values;
 * a 16 Ki loop would exceed the verifier's jump history). Same layout as agg_copy but
 * without the lock: a value holding a bpf_spin_lock may not be a helper's source
 * ("bpf_spin_lock cannot be accessed directly by load/store", kernel 6.18). */
struct agg_copy_plain {
	__u32 lock_word;
	__u32 round;
	__u64 contributors;
	__u32 arrived, count, flags, pad;
	__s32 chunk_exp[AGG_MAX_CHUNKS];
	__s32 values[AGG_MAX_VALUES];
};
_Static_assert(sizeof(struct agg_copy_plain) == sizeof(struct agg_copy), "same layout");
BPF_ARRAY(zero_copy, struct agg_copy_plain, 1);

/* Reset the other copy of the slot for the round after this one (see the top comment). */
static __always_inline void reset_for_next_round(__u32 key, __u32 round)
{
	__u32 other_key = key ^ 1, zero = 0;
	struct agg_copy *blank = zero_copy.lookup(&zero);
	if (!blank)
		return;
	slots.update(&other_key, blank);
	struct agg_copy *other = slots.lookup(&other_key);
	if (!other)
		return;
	bpf_spin_lock(&other->lock);
	other->round = round + 1;
	bpf_spin_unlock(&other->lock);
}

/* Send the result (already in the packet) from the aggregator to every worker. */
static __always_inline int fan_out_result(struct __sk_buff *skb, struct agg_job *job)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	__u32 old_src = ip->saddr, cur_dst = ip->daddr, my_ip = job->my_ip;
	bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), old_src, my_ip, 4);
	bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, saddr), &my_ip, 4, 0);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), job->my_mac, ETH_ALEN, 0);
	__u32 sent = 0;
#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (__u32 i = 0; i < AGGBOX_MAX_MEMBERS; i++) {
		if (i >= job->n_workers)
			break;
		__u32 wkey = job->index * AGGBOX_MAX_MEMBERS + i;
		struct agg_worker *w = workers.lookup(&wkey);
		if (!w)
			break;
		__u32 ip_new = w->ip;
		bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), cur_dst, ip_new, 4);
		bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, daddr), &ip_new, 4, 0);
		bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), w->mac, ETH_ALEN, 0);
		cur_dst = ip_new;
		if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
			sent++;
		else
			count(CNT_FANOUT_ERRORS);
	}
	__u32 idx = CNT_FANOUT_COPIES;
	__u64 *c = counters.lookup(&idx);
	if (c)
		*c += sent;
	return TC_ACT_STOLEN;
}

int agg_finish(struct __sk_buff *skb)
{
	struct agg_progress *pr = get_progress();
	if (!pr)
		return TC_ACT_SHOT;
	__u32 key = pr->key;
	struct agg_copy *cp = slots.lookup(&key);
	__u32 job_id = pr->job_id;
	struct agg_job *job = jobs.lookup(&job_id);
	if (!cp || !job)
		return TC_ACT_SHOT;
	bpf_spin_lock(&cp->lock);
	cp->arrived += 1;
	int complete = cp->arrived == pr->n_workers;
	__u32 round = cp->round;
	bpf_spin_unlock(&cp->lock);
	count(CNT_AGG_ADDED);
	if (!complete)
		return TC_ACT_STOLEN; /* consumed: its values are in the slot */

	/* The last block in: this packet becomes the result. */
	reset_for_next_round(key, round);
	if (write_result(skb, cp, pr->count) != 0)
		return TC_ACT_SHOT;
	set_type(skb, AGGBOX_AGG_RESULT, pr->flags, 0);
	if (pr->flags & AGG_F_ALIGN)
		set_scale(skb, cp);
	count(CNT_AGG_COMPLETED);
	return fan_out_result(skb, job);
}

/* A worker sent a block that its slot already counted: it lost the result (answer it
 * from the finished copy) or it is impatient (tell it whose blocks are still missing). */
int agg_reply(struct __sk_buff *skb)
{
	struct agg_progress *pr = get_progress();
	if (!pr)
		return TC_ACT_SHOT;
	__u32 key = pr->key;
	struct agg_copy *cp = slots.lookup(&key);
	if (!cp)
		return TC_ACT_SHOT;
	if (pr->complete) {
		if (write_result(skb, cp, pr->count) != 0)
			return TC_ACT_SHOT;
		set_type(skb, AGGBOX_AGG_RESULT, pr->flags, 0);
		if (pr->flags & AGG_F_ALIGN)
			set_scale(skb, cp);
		count(CNT_AGG_LATE_REPLY);
	} else {
		/* A bare header: count 0, aux = the contributor bitmap (ranks 0..31). */
		if (bpf_skb_change_tail(skb, PAYLOAD_OFF, 0) != 0)
			return TC_ACT_SHOT;
		__u16 tot = bpf_htons(PAYLOAD_OFF - IP_OFF), ulen = bpf_htons(PAYLOAD_OFF - UDP_OFF);
		__u16 zero16 = 0;
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct iphdr *ip = data + IP_OFF;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		__u16 old_tot = ip->tot_len;
		bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), old_tot, tot, 2);
		bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, tot_len), &tot, 2, 0);
		bpf_skb_store_bytes(skb, UDP_OFF + offsetof(struct udphdr, len), &ulen, 2, 0);
		bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, count), &zero16, 2, 0);
		set_type(skb, AGGBOX_AGG_RESULT, pr->flags | AGG_F_STATUS, (__u32)pr->contributors);
		count(CNT_AGG_STATUS);
	}
	/* Back to the worker that asked: swap Ethernet and IP addresses (the IP checksum is
	 * a sum: a swap leaves it valid); both ends use the job's port. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__u32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	return bpf_redirect(skb->ifindex, 0);
}
