/* SPDX-License-Identifier: Apache-2.0
 *
 * aggregate.c: in-kernel aggregation ("the box"): workers' int32 blocks summed in a pool
 * of pool slots, the result sent to every worker from the kernel.
 *
 * The packet's path, on the aggregator's TC ingress:
 *
 *   agg_ingress  parse, check (magic, version, job, token, member, both lengths, an
 *                authenticated job's tag, scale exponent), find the block's pool slot
 *                (seq mod pool) and copy (round parity); under the copy's lock: a block
 *                already counted in is answered by agg_reply, never added twice; nothing
 *                is claimed here
 *   agg_add      x N   one chunk (AGG_CHUNK values) per program under the CHUNK's lock,
 *                then tail-calls itself for the next: a chain of ceil(count / AGG_CHUNK)
 *                programs, progress in a per-CPU map. A chunk records the workers whose
 *                values it holds, so an add is idempotent per worker: the first writer
 *                of a round stores, the others add (or max), a retransmission skips
 *   agg_finish   counts the worker in (its bit in `done`, once); the LAST one starts the
 *                pool slot's other copy on the next round, turns its own packet into the
 *                result and sends it once to the job's multicast group (or, per job,
 *                clones it to every worker: see AGG_RESULTS_*)
 *   agg_reply    a duplicate of a finished block gets the finished copy's result (the
 *                worker lost it); of an unfinished block, a status naming who is in;
 *                either by unicast, to the worker that asked only
 *
 * A chain that breaks anywhere (a drop, a failed tail call) leaves only chunks holding
 * the worker's values, no claim: its retransmission adds the rest and completes the pool
 * slot.
 *
 * Words: a job's "job slot" is its part of the per-job arrays (as in every family); a
 * "pool slot" is one of the job's AGG_POOL places a block is summed in (block seq mod
 * AGG_POOL), with two copies each.
 *
 * Two copies per pool slot (SwitchML's shadow copy): round r of a pool slot uses copy
 * r & 1. A worker sends round r + 1 of a pool slot only after it has the result of round
 * r, so when round r completes every worker already has round r - 1's result and its copy can be
 * restarted (under its lock, metadata only: its chunks are blank by their older round);
 * the finished copy of round r stays intact until round r + 1 completes, which is
 * what answers late retransmissions. Only one user-space process per worker is involved;
 * the aggregator's user space only installs jobs (aggbox/collectives/allreduce.py).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#ifndef AGG_MAX_VALUES
#define AGG_MAX_VALUES 16384 /* largest block, in int32 values; a power of two */
#endif
#ifndef AGG_CHUNK
#define AGG_CHUNK 1024 /* values one program of the chain walks */
#endif
#ifndef AGG_POOL_SHIFT
#define AGG_POOL_SHIFT 5 /* 32 pool slots per job: a worker's window */
#endif
#ifndef AGG_MAX_JOBS
#define AGG_MAX_JOBS 4 /* < AGGBOX_MAX_JOBS: each job slot holds 4 MiB of chunks */
#endif
#define JOB_SLOTS AGG_MAX_JOBS
#define AGG_POOL (1u << AGG_POOL_SHIFT)
#define AGG_MAX_CHUNKS (AGG_MAX_VALUES / AGG_CHUNK)

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/check.h"
#include "lib/reply.h"
#include "lib/siphash.h"

_Static_assert((AGG_MAX_VALUES & (AGG_MAX_VALUES - 1)) == 0, "AGG_MAX_VALUES: power of 2");
_Static_assert(AGG_MAX_VALUES / AGG_CHUNK <= 30, "the chain would exceed the tail-call limit");

/* The exponents aggbox/quant.py can produce (float64 frexp of 2^-1074 .. < 2^1024, and
 * ZERO_BLOCK_EXPONENT): anything else is refused (it would shift a whole chunk out). */
#define AGG_EXP_MIN (-1074)
#define AGG_EXP_MAX 1024

/* A block's round is the high 32 - AGG_POOL_SHIFT bits of its seq, and seq wraps (a long
 * job sends 2^32 blocks: ~10 million calls of 25 MiB buckets): rounds are compared as
 * serial numbers of that width, and the round after the last is 0. */
#define ROUND_MASK (0xffffffffu >> AGG_POOL_SHIFT)

static __always_inline int round_after(__u32 a, __u32 b)
{
	return (__s32)((a - b) << AGG_POOL_SHIFT) > 0;
}

static __always_inline __u32 next_round(__u32 round)
{
	return (round + 1) & ROUND_MASK;
}

/* ---------------------------------------------------------------- maps -------------- */

/* `config` (ports) and `members` (the workers; key: job slot * AGGBOX_MAX_MEMBERS +
 * rank): lib/check.h */

enum chain_index { CHAIN_ADD = 0, CHAIN_FINISH = 1, CHAIN_REPLY = 2, CHAIN_LEN };
/* user space fills `chain` with agg_add, agg_finish, agg_reply in this order */
BPF_PROG_ARRAY(chain, CHAIN_LEN);

/* How a finished block reaches the workers (struct agg_job.results, chosen per job at
 * install time). MULTICAST: the result is sent ONCE, to the job's IP multicast group
 * (result_ip, result_mac 01:00:5e:..), and the L2 network replicates it to every port
 * (each copy a clone of one skb, sharing its data); the workers joined the group, other
 * hosts' kernels drop it. UNICAST: one clone per worker, each with its own addresses:
 * rewriting the head of an skb that was just cloned copies the whole (linear) result,
 * N - 1 times per block; for networks that do not carry multicast. */
#define AGG_RESULTS_UNICAST   0
#define AGG_RESULTS_MULTICAST 1

struct agg_job {
	AGGBOX_JOB_PREFIX; /* n_members: the workers; my_rank: unused (no worker) */
	__u32 my_ip;     /* the aggregator's address (network order) */
	__u8 my_mac[6];
	__u16 results;   /* AGG_RESULTS_* */
	__u32 result_ip; /* MULTICAST: the job's group (network order) */
	__u8 result_mac[6];
	__u16 pad;
	__u32 auth;      /* 1: an authenticated job: every packet tagged under `key` */
	__u16 epoch;     /* this installation of the job (nonzero), in every reply's round */
	__u16 pad2;
	struct sip_key key;
};
BPF_HASH(jobs, __u32, struct agg_job, JOB_SLOTS);

/* Who is in one copy of a pool slot. A worker's bit in `done` is set only by agg_finish,
 * once every chunk of its block is in: a chain that breaks half-way (a drop, a failed
 * tail call) leaves no claim behind, and the worker's retransmission finishes the job. */
struct agg_copy {
	struct bpf_spin_lock lock;
	__u32 round;  /* the round this copy holds */
	__u64 done;   /* bit r: worker r's block is fully added */
	__u32 arrived;/* popcount(done) */
	__u32 count;  /* values in the block (set by the round's first accepted block) */
	__u32 flags;  /* that block's AGGBOX_F_OP_MAX / AGGBOX_F_ALIGN */
	__u32 shaped; /* count and flags are set */
	__u32 fresh;  /* installed and not used since: may adopt any round of its parity (below) */
};
/* key: (job slot * AGG_POOL + pool slot) * 2 + copy */
BPF_ARRAY(slots, struct agg_copy, JOB_SLOTS * AGG_POOL * 2);

/* One chunk of a pool slot copy, with its own lock: two CPUs add different chunks of one
 * block at once. Initialised lazily: a chunk whose round is older than the block's is
 * blank, and the first writer of a round STORES its values (no zeroed copy, and a MAX of
 * negative values is right). `added` makes the adds idempotent per worker: a
 * retransmission re-walks the chain and adds only the chunks that are not in yet. */
struct agg_chunk_state {
	struct bpf_spin_lock lock;
	__u32 round;  /* the round the values belong to */
	__u64 added;  /* bit r: worker r's values of this chunk are in */
	__s32 exp;    /* AGGBOX_F_ALIGN: the exponent the values are at */
	__u32 pad;
	__s32 values[AGG_CHUNK];
};
/* key: copy key * AGG_MAX_CHUNKS + chunk */
BPF_ARRAY(chunks, struct agg_chunk_state, JOB_SLOTS * AGG_POOL * 2 * AGG_MAX_CHUNKS);

/* What one packet's chain carries from program to program (lib/chain.h). */
struct agg_progress {
	__u32 job_id;
	__u32 key;       /* the pool slot copy */
	__u32 next;      /* the next value to add */
	__u32 count;
	__u32 flags;
	__u32 n_members;
	__u32 complete;  /* agg_reply: the copy is finished (else: send a status) */
	__s32 exp;       /* AGGBOX_F_ALIGN: the contribution's exponent */
	__u32 round;
	__u32 bias;      /* AGGBOX_F_ALIGN: what each value carries, 2**B (align_bias) */
	__u64 bit;       /* the sender's rank bit */
	__u64 done;      /* agg_reply: the workers whose block is in */
};
BPF_PERCPU_ARRAY(progress, struct agg_progress, 1);

struct agg_chunk {
	__s32 v[AGG_CHUNK];
};
BPF_PERCPU_ARRAY(chunk_buf, struct agg_chunk, 1);

/* lib/chain.h reads `progress` and `chunk_buf`: included after them */
#include "lib/chain.h"

/* ---------------------------------------------------------------- parse and check --- */

/* The sender's checks (lib/check.h), then the block's: the tag flag, both lengths, the
 * tag of an authenticated job (lib/siphash.h) and the exponent. Returns the job, or NULL
 * with *reason set. */
static __always_inline struct agg_job *check_block(struct __sk_buff *skb, struct pkt *p,
						   int *reason)
{
	__u32 job_id = p->hdr->job_id;
	struct agg_job *job = (void *)check_sender(p, jobs.lookup(&job_id), ANY_TYPE,
						   SELF_MAY_SEND, reason);
	if (!job)
		return NULL;
	if (!auth_flag_matches(job->auth, p->hdr)) {
		*reason = CNT_DROP_BAD_MAC;
		return NULL;
	}
	__u32 count = p->hdr->count;
	if (count == 0 || count > AGG_MAX_VALUES ||
	    !payload_fits(skb->len, p, count * 4 + auth_tag_len(job->auth))) {
		*reason = CNT_DROP_TRUNCATED;
		return NULL;
	}
	if (!authentic(skb, job->auth, &job->key, p->hdr, PAYLOAD_OFF + count * 4)) {
		*reason = CNT_DROP_BAD_MAC;
		return NULL;
	}
	if ((p->hdr->flags & AGGBOX_F_ALIGN) &&
	    (p->hdr->scale_exp < AGG_EXP_MIN || p->hdr->scale_exp > AGG_EXP_MAX)) {
		*reason = CNT_AGG_BAD_SCALE;
		return NULL;
	}
	return job;
}

/* What agg_ingress found in the block's copy (under its lock). */
enum copy_verdict {
	COPY_ADD = 0,       /* not in yet: walk the chain */
	COPY_STALE_ROUND,   /* the copy is at another round */
	COPY_DUPLICATE,     /* this worker's block is counted in: answer it */
	COPY_SHAPE_MISMATCH,/* its count or operation differs from the copy's other blocks */
};

static __always_inline int copy_verdict(struct agg_copy *cp, struct agg_progress *pr,
					__u32 round, __u64 bit, __u32 n, __u32 flags,
					__u32 n_members)
{
	int verdict = COPY_ADD;
	bpf_spin_lock(&cp->lock);
	/* A job installed while its workers are mid-sequence (the aggregator restarted, or
	 * its seqs are near the wrap): a copy nobody used yet takes the first round of its
	 * parity sent to it, whatever it is (nothing older to protect); so do blank chunks. */
	if (cp->fresh && round != cp->round && !((round ^ cp->round) & 1))
		cp->round = round;
	if (cp->round != round) {
		verdict = COPY_STALE_ROUND;
	} else if (cp->done & bit) {
		verdict = COPY_DUPLICATE;
		pr->complete = cp->arrived == n_members;
		pr->done = cp->done;
	} else if (cp->shaped && (cp->count != n || cp->flags != flags)) {
		verdict = COPY_SHAPE_MISMATCH;
	} else if (!cp->shaped) {
		cp->count = n;
		cp->flags = flags;
		cp->shaped = 1;
		cp->fresh = 0;
	}
	bpf_spin_unlock(&cp->lock);
	return verdict;
}

/* ---------------------------------------------------------------- act --------------- */

/* How agg_add combines one chunk, chosen once per chunk so that each loop is plain. */
enum add_mode {
	MODE_STALE = 0, /* the chunk is at a newer round: a late packet, dropped */
	MODE_SKIP,      /* this worker's values of the chunk are already in */
	MODE_STORE,     /* the round's first writer */
	MODE_ADD,       /* sum += in, each int32 lane wrapping (SWAR) */
	MODE_SHIFT_SUM, /* sum = round(sum / 2**d) + in: the contribution has a larger exponent */
	MODE_SHIFT_IN,  /* sum += round(in / 2**d) */
	MODE_MAX,       /* sum = max(sum, in) */
	MODE_NONE,      /* aligned: the input shifts out entirely: only its bias is added */
	MODE_ADD_LANES, /* aligned: sum += in as plain 64-bit words (biased lanes never carry) */
	MODE_STORE_OVER, /* aligned: the sum shifts out entirely: sum = in + the others' bias */
};

/* Aligned blocks are biased (AGGBOX_F_ALIGN, aggbox/collectives/allreduce.py): a worker
 * sends each value plus 2**B (B = quant.headroom_bits(n): |q| <= 2**B), so every value
 * is non-negative, and a chunk holding c contributions holds sum(q) + c * 2**B <=
 * 2 n 2**B <= 2**31 in each lane: two lanes of a 64-bit word add with one add and no
 * carry between them. The alignment shifts take the bias off, shift, and put it back. */
static __always_inline __u32 align_bias(__u32 n_members)
{
	__u32 ceil_log2 = 0;
#pragma clang loop unroll(full)
	for (int k = 0; k < 7; k++) /* n <= 64 */
		if ((1u << ceil_log2) < n_members)
			ceil_log2++;
	return 1u << (30 - ceil_log2);
}

/* Decide the chunk's mode under its lock (and start the chunk's round if it is blank). */
static __always_inline int chunk_mode(struct agg_chunk_state *ch, struct agg_progress *pr,
				      __u32 *d)
{
	if (ch->round != pr->round) {
		/* a chunk nobody wrote since the job was installed (added 0) is blank at any
		 * round: its round 0 may look newer than a job's first round near the wrap */
		if (ch->added && round_after(ch->round, pr->round))
			return MODE_STALE;
		ch->round = pr->round; /* older values: blank for this round */
		ch->added = 0;
	}
	if (ch->added & pr->bit)
		return MODE_SKIP;
	if (!ch->added) {
		ch->exp = pr->exp;
		return MODE_STORE;
	}
	if (pr->flags & AGGBOX_F_OP_MAX)
		return MODE_MAX;
	if (!(pr->flags & AGGBOX_F_ALIGN))
		return MODE_ADD;
	/* AGGBOX_F_ALIGN: bring the chunk and the contribution to the larger exponent
	 * (rounding right shifts; see aggbox/quant.py for the error this adds). */
	__s32 mine = pr->exp, cur = ch->exp;
	if (mine > cur) {
		ch->exp = mine;
		*d = mine - cur;
		return *d > 30 ? MODE_STORE_OVER : MODE_SHIFT_SUM;
	}
	*d = cur - mine;
	if (*d == 0)
		return MODE_ADD_LANES;
	return *d > 30 ? MODE_NONE : MODE_SHIFT_IN;
}

/* The loops below keep their indices away from clang (barrier_var): it would otherwise
 * drop `i < AGG_CHUNK` as implied by n, or turn the loop into memcpy / pointer walks that
 * the verifier cannot follow. */
#define CHUNK_LOOP(body)                                                              \
	_Pragma("clang loop unroll(disable) vectorize(disable) interleave(disable)")    \
	for (__u32 i = 0; i < AGG_CHUNK; i++) {                                         \
		if (i >= n)                                                             \
			break;                                                          \
		__u32 j = i;                                                            \
		barrier_var(j);                                                         \
		j &= AGG_CHUNK - 1;                                                     \
		body;                                                                   \
	}

/* The same over pairs of values as 64-bit words (j: the pair), four pairs per
 * iteration (the loop's compare, branch and bound mask per pair were a third of its
 * instructions), nq = ceil(n / 8) iterations: up to 7 values past n are combined too.
 * They are harmless: every block of a pool slot copy has the same count (the shape
 * check), so a chunk's values past it are never part of a result. */
#define PAIR_AT(q, k, body)                                                           \
	do {                                                                          \
		__u32 j = (q) * 4 + (k);                                              \
		barrier_var(j);                                                       \
		j &= AGG_CHUNK / 2 - 1;                                               \
		body;                                                                 \
	} while (0)
#define PAIR_LOOP(body)                                                               \
	_Pragma("clang loop unroll(disable) vectorize(disable) interleave(disable)")    \
	for (__u32 q = 0; q < AGG_CHUNK / 8; q++) {                                     \
		if (q >= nq)                                                            \
			break;                                                          \
		PAIR_AT(q, 0, body);                                                    \
		PAIR_AT(q, 1, body);                                                    \
		PAIR_AT(q, 2, body);                                                    \
		PAIR_AT(q, 3, body);                                                    \
	}

/* SWAR: two int32 lanes of a 64-bit word added at once, each wrapping like int32. The
 * lanes' low 31 bits are added with bit 31 cleared in both (so no carry crosses into
 * the next lane), then bit 31 of each lane is the carry xor the two inputs' bits 31. */
#define LANE_TOPS 0x8000000080000000ULL
static __always_inline __u64 add_lanes(__u64 a, __u64 b)
{
	return ((a & ~LANE_TOPS) + (b & ~LANE_TOPS)) ^ ((a ^ b) & LANE_TOPS);
}

struct agg_pairs {
	__u64 w[AGG_CHUNK / 2];
};
_Static_assert(__builtin_offsetof(struct agg_chunk_state, values) % 8 == 0, "values 8-aligned");

/* Combine n values of `buf` into the chunk, as `mode` says (under the chunk's lock);
 * `bias`: an aligned value's (align_bias), `others`: the bias of the contributions the
 * chunk holds already. */
static __always_inline void combine(struct agg_chunk_state *ch, struct agg_chunk *buf,
				    __u32 n, int mode, __u32 d, __u32 bias, __u32 others)
{
	/* Eight values per iteration, in two int32 lanes of four words. */
	struct agg_pairs *dst = (void *)ch->values, *src = (void *)buf->v;
	__u32 nq = (n + 7) / 8;
	/* x / 2**d rounded to nearest, 1 <= d <= 30 (|x| <= 2**30: no overflow) */
	__u32 dd = d & 31;
	__s32 half = 1 << ((dd - 1) & 31);
	if (mode == MODE_STORE) {
		PAIR_LOOP(dst->w[j] = src->w[j]);
	} else if (mode == MODE_ADD_LANES) {
		PAIR_LOOP(dst->w[j] += src->w[j]);
	} else if (mode == MODE_ADD) {
		PAIR_LOOP(dst->w[j] = add_lanes(dst->w[j], src->w[j]));
	} else if (mode == MODE_STORE_OVER) {
		__u64 both = (__u64)others << 32 | others;
		PAIR_LOOP(dst->w[j] = src->w[j] + both);
	} else if (mode == MODE_NONE) {
		__u64 both = (__u64)bias << 32 | bias;
		PAIR_LOOP(dst->w[j] += both);
	} else if (mode == MODE_MAX) {
		CHUNK_LOOP(if (buf->v[j] > ch->values[j]) ch->values[j] = buf->v[j]);
	} else if (mode == MODE_SHIFT_SUM) {
		CHUNK_LOOP(ch->values[j] = ((((__s32)((__u32)ch->values[j] - others)) + half) >> dd)
					   + (__s32)(others + (__u32)buf->v[j]));
	} else if (mode == MODE_SHIFT_IN) {
		CHUNK_LOOP(ch->values[j] += ((((__s32)((__u32)buf->v[j] - bias)) + half) >> dd)
					    + (__s32)bias);
	}
}

/* Make the packet a result carrying the values of copy `key` (same length as the block
 * it was): one store per chunk. A large block's values arrive in page fragments; each
 * store makes the bytes it writes linear first, so chunk by chunk the head would be
 * reallocated and copied 16 times, growing by 4 KiB each time: one pull of the whole
 * packet first makes it linear once. */
static __always_inline int write_result(struct __sk_buff *skb, __u32 key, __u32 count)
{
	if (bpf_skb_pull_data(skb, skb->len) != 0)
		return -1;
#pragma clang loop unroll(disable)
	for (__u32 c = 0; c < AGG_MAX_CHUNKS; c++) {
		__u32 off = c * AGG_CHUNK;
		if (off >= count)
			break;
		__u32 n = count - off;
		if (n > AGG_CHUNK)
			n = AGG_CHUNK;
		__u32 ckey = key * AGG_MAX_CHUNKS + c;
		struct agg_chunk_state *ch = chunks.lookup(&ckey);
		if (!ch)
			return -1;
		__u32 len = n * 4;
		barrier_var(len);
		len &= AGG_CHUNK * 8 - 1; /* restates the bound for the verifier */
		if (len < 4 || len > AGG_CHUNK * 4)
			return -1;
		if (bpf_skb_store_bytes(skb, PAYLOAD_OFF + off * 4, ch->values, len, 0) != 0)
			return -1;
	}
	return 0;
}

/* The result's exponent (AGGBOX_F_ALIGN): every chunk ends at the group's largest, since
 * every worker sends one exponent for its whole block. */
static __always_inline void set_scale(struct __sk_buff *skb, __u32 key)
{
	__u32 ckey = key * AGG_MAX_CHUNKS;
	struct agg_chunk_state *ch = chunks.lookup(&ckey);
	if (!ch)
		return;
	__s16 e = ch->exp;
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, scale_exp), &e, 2, 0);
}

static __always_inline __u16 auth_flag(struct agg_job *job)
{
	return job->auth ? AGGBOX_F_AUTH : 0;
}

/* The reply's type, flags and aux; its round field says which installation of the job
 * answers (a worker that sees it change mid-call knows the aggregator restarted and
 * lost its partial sums), and an authenticated job's flag is set. */
static __always_inline void set_type(struct __sk_buff *skb, struct agg_job *job, __u8 type,
				     __u16 flags, __u32 aux)
{
	flags |= auth_flag(job);
	__u16 epoch = job->epoch;
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, type), &type, 1, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, flags), &flags, 2, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, round), &epoch, 2, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, aux), &aux, 4, 0);
	/* The UDP checksum is set once the addresses are final (udp_csum_rewritten). */
}

/* An authenticated job's reply carries the kernel's tag of its final header where the
 * worker's tag was (the 8 bytes after the payload). */
static __always_inline int tag_reply(struct __sk_buff *skb, struct agg_job *job,
				     __u32 payload_len)
{
	return job->auth ? write_tag(skb, &job->key, PAYLOAD_OFF + payload_len) : 0;
}

/* The packet becomes the finished result of copy `key`: values, type, exponent (and,
 * for an authenticated job, its tag). */
static __always_inline int make_result(struct __sk_buff *skb, struct agg_job *job,
				       struct agg_progress *pr)
{
	if (write_result(skb, pr->key, pr->count) != 0)
		return -1;
	set_type(skb, job, AGGBOX_AGG_RESULT, pr->flags, 0);
	if (pr->flags & AGGBOX_F_ALIGN)
		set_scale(skb, pr->key);
	return tag_reply(skb, job, pr->count * 4);
}

/* The packet becomes a status: count 2, the payload the 64-bit bitmap of the workers
 * whose block is in (little-endian), aux its low 32 bits. */
static __always_inline int make_status(struct __sk_buff *skb, struct agg_job *job,
				       struct agg_progress *pr)
{
	__u32 plen = PAYLOAD_OFF + 8 + auth_tag_len(job->auth);
	if (bpf_skb_change_tail(skb, plen, 0) != 0)
		return -1;
	__u16 tot = bpf_htons(plen - IP_OFF), ulen = bpf_htons(plen - UDP_OFF);
	__u16 two = 2;
	__u64 done = pr->done;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return -1;
	__u16 old_tot = ip->tot_len;
	bpf_l3_csum_replace(skb, IP_CHECK_OFF, old_tot, tot, 2);
	bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, tot_len), &tot, 2, 0);
	bpf_skb_store_bytes(skb, UDP_OFF + offsetof(struct udphdr, len), &ulen, 2, 0);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, count), &two, 2, 0);
	bpf_skb_store_bytes(skb, PAYLOAD_OFF, &done, 8, 0);
	set_type(skb, job, AGGBOX_AGG_RESULT, pr->flags | AGGBOX_F_STATUS, (__u32)done);
	return tag_reply(skb, job, 8);
}

/* Start the other copy of the pool slot on the round after this one (see the top
 * comment): all under its lock, so no packet ever sees a half-reset copy. Its chunks are
 * blank by their older round: nothing else to clear. */
static __always_inline void reset_for_next_round(__u32 key, __u32 round)
{
	__u32 other_key = key ^ 1;
	struct agg_copy *other = slots.lookup(&other_key);
	if (!other)
		return;
	__u32 next = next_round(round);
	bpf_spin_lock(&other->lock);
	if (round_after(next, other->round)) {
		other->round = next;
		other->done = 0;
		other->arrived = 0;
		other->count = 0;
		other->flags = 0;
		other->shaped = 0;
		other->fresh = 0;
	}
	bpf_spin_unlock(&other->lock);
}

/* The result leaves from the aggregator: its IP and MAC become the source. Returns 0 and
 * the packet's destination in *dst, or -1 when the packet is too short. */
static __always_inline int from_aggregator(struct __sk_buff *skb, struct agg_job *job,
					   __u32 *dst)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return -1;
	__u32 old_src = ip->saddr, my_ip = job->my_ip;
	*dst = ip->daddr;
	bpf_l3_csum_replace(skb, IP_CHECK_OFF, old_src, my_ip, 4);
	bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, saddr), &my_ip, 4, 0);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), job->my_mac, ETH_ALEN, 0);
	return 0;
}

/* Send the result (already in the packet) from the aggregator to every worker. */
static __always_inline int fan_out_result(struct __sk_buff *skb, struct agg_job *job)
{
	__u32 dst = 0;
	if (from_aggregator(skb, job, &dst) != 0)
		return TC_ACT_SHOT;
	/* Each clone's pseudo-header change is folded in by clone_to_members. */
	if (udp_csum_rewritten(skb) != 0)
		return TC_ACT_SHOT;
	clone_to_members(skb, (void *)job, dst, AGGBOX_MAX_MEMBERS);
	return TC_ACT_STOLEN;
}

/* Send the result (already in the packet) ONCE, from the aggregator to the job's group:
 * two address rewrites, no clone here (the bridge's copies are clones of this skb). */
static __always_inline int multicast_result(struct __sk_buff *skb, struct agg_job *job)
{
	__u32 old_dst = 0, grp = job->result_ip;
	if (from_aggregator(skb, job, &old_dst) != 0)
		return TC_ACT_SHOT;
	bpf_l3_csum_replace(skb, IP_CHECK_OFF, old_dst, grp, 4);
	bpf_skb_store_bytes(skb, IP_OFF + offsetof(struct iphdr, daddr), &grp, 4, 0);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), job->result_mac, ETH_ALEN, 0);
	if (udp_csum_rewritten(skb) != 0)
		return TC_ACT_SHOT;
	count(CNT_FANOUT_COPIES); /* one copy leaves the aggregator */
	return bpf_redirect(skb->ifindex, 0);
}

/* The next program of the block's chain; returns only when the tail call failed. */
static __always_inline void tail_call(struct __sk_buff *skb, __u32 index)
{
	chain.call(skb, index);
	count(CNT_AGG_CHAIN_BROKEN);
}

/* ---------------------------------------------------------------- tail-call targets - */

/* One chunk of the block into its chunk (under the chunk's lock), then the next. */
int agg_add(struct __sk_buff *skb)
{
	struct agg_progress *pr = get_progress();
	if (!pr)
		return TC_ACT_SHOT;
	__u32 off = pr->next, n = 0;
	__u32 ckey = pr->key * AGG_MAX_CHUNKS + ((off / AGG_CHUNK) & (AGG_MAX_CHUNKS - 1));
	struct agg_chunk_state *ch = chunks.lookup(&ckey);
	struct agg_chunk *buf = NULL;
	if (!ch || load_chunk(skb, off, pr->count, AGG_MAX_VALUES, 4, AGG_CHUNK,
			      AGG_CHUNK * 8 - 1, (void **)&buf, &n) != CHUNK_LOADED || !buf)
		return TC_ACT_SHOT;
	barrier_var(n);
	__u32 d = 0;
	bpf_spin_lock(&ch->lock);
	int mode = chunk_mode(ch, pr, &d);
	/* the bias of the contributions in (0 for a chunk chunk_mode just started) */
	__u32 others = pr->bias * (__u32)__builtin_popcountll(ch->added);
	combine(ch, buf, n, mode, d, pr->bias, others);
	if (mode != MODE_STALE)
		ch->added |= pr->bit;
	bpf_spin_unlock(&ch->lock);
	if (mode == MODE_STALE) {
		count(CNT_AGG_STALE_ROUND);
		return TC_ACT_SHOT;
	}
	pr->next = off + n;
	tail_call(skb, pr->next < pr->count ? CHAIN_ADD : CHAIN_FINISH);
	return TC_ACT_SHOT;
}

/* What agg_finish found when counting the worker in. */
enum finish_verdict {
	FINISH_COUNTED = 0, /* counted in */
	FINISH_STALE_ROUND, /* the copy moved on meanwhile */
	FINISH_RACED,       /* a copy of the block raced this one and counted it first */
};

/* Every chunk holds this worker's values now (added by this chain or by an earlier copy
 * of the block): count it in, once; the last block in becomes the result. */
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
	int verdict = FINISH_COUNTED;
	int complete = 0;
	bpf_spin_lock(&cp->lock);
	if (cp->round != pr->round) {
		verdict = FINISH_STALE_ROUND;
	} else if (cp->done & pr->bit) {
		verdict = FINISH_RACED;
	} else {
		cp->done |= pr->bit;
		cp->arrived += 1;
		complete = cp->arrived == pr->n_members;
	}
	bpf_spin_unlock(&cp->lock);
	if (verdict != FINISH_COUNTED) {
		count(verdict == FINISH_STALE_ROUND ? CNT_AGG_STALE_ROUND : CNT_AGG_DUPLICATE);
		return TC_ACT_SHOT;
	}
	count(CNT_AGG_ADDED);
	if (!complete)
		return TC_ACT_STOLEN; /* consumed: its values are in the pool slot */

	/* The last block in: this packet becomes the result. */
	reset_for_next_round(key, pr->round);
	if (make_result(skb, job, pr) != 0)
		return TC_ACT_SHOT;
	count(CNT_AGG_COMPLETED);
	if (job->results == AGG_RESULTS_MULTICAST)
		return multicast_result(skb, job);
	return fan_out_result(skb, job);
}

/* A worker sent a block that its pool slot already counted: it lost the result (answer
 * it from the finished copy) or it is impatient (tell it whose blocks are still missing);
 * by unicast, to the worker that asked only. */
int agg_reply(struct __sk_buff *skb)
{
	struct agg_progress *pr = get_progress();
	if (!pr)
		return TC_ACT_SHOT;
	__u32 job_id = pr->job_id;
	struct agg_job *job = jobs.lookup(&job_id);
	if (!job)
		return TC_ACT_SHOT;
	if (pr->complete) {
		if (make_result(skb, job, pr) != 0)
			return TC_ACT_SHOT;
		count(CNT_AGG_LATE_REPLY);
	} else {
		if (make_status(skb, job, pr) != 0)
			return TC_ACT_SHOT;
		count(CNT_AGG_STATUS);
	}
	/* Both ends use the job's port: only the addresses are swapped. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	swap_addresses(data, ip);
	if (udp_csum_rewritten(skb) != 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* ---------------------------------------------------------------- entry points ------ */

/* Check a worker's block, find its pool slot copy, and start the chain. */
int agg_ingress(struct __sk_buff *skb)
{
	/* A large block may arrive with only its network headers in the linear part of
	 * the skb: pull the AggBox header in (payload reads go through bpf_skb_load_bytes,
	 * which handles the rest wherever it lies). */
	if (skb->len >= PAYLOAD_OFF &&
	    (void *)(long)skb->data + PAYLOAD_OFF > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, PAYLOAD_OFF);
	struct pkt p = {};
	/* By magic: a datagram to an aggregation port without AggBox's magic is another
	 * program's (the ports lie where other software may use them) and passes untouched. */
	int found = find_header((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
				skb->pkt_type != PACKET_HOST);
	if (found != FIND_OK)
		return found == FIND_NOT_OURS ? TC_ACT_UNSPEC : TC_ACT_SHOT;
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
	__u32 key = ((job->slot * AGG_POOL) + (seq & (AGG_POOL - 1))) * 2 + (round & 1);
	__u64 bit = 1ULL << (p.hdr->rank & 63);
	__u32 n = p.hdr->count;
	__u32 flags = p.hdr->flags & (AGGBOX_F_OP_MAX | AGGBOX_F_ALIGN);
	struct agg_copy *cp = slots.lookup(&key);
	struct agg_progress *pr = get_progress();
	if (!cp || !pr)
		return TC_ACT_SHOT;
	int verdict = copy_verdict(cp, pr, round, bit, n, flags, job->n_members);
	pr->job_id = p.hdr->job_id;
	pr->key = key;
	pr->next = 0;
	pr->count = n;
	pr->flags = flags;
	pr->n_members = job->n_members;
	pr->exp = p.hdr->scale_exp;
	pr->bias = align_bias(job->n_members);
	pr->round = round;
	pr->bit = bit;
	if (verdict == COPY_STALE_ROUND || verdict == COPY_SHAPE_MISMATCH) {
		count(verdict == COPY_STALE_ROUND ? CNT_AGG_STALE_ROUND : CNT_AGG_SHAPE_MISMATCH);
		return TC_ACT_SHOT;
	}
	if (verdict == COPY_DUPLICATE) {
		count(CNT_AGG_DUPLICATE);
		tail_call(skb, CHAIN_REPLY);
		return TC_ACT_SHOT;
	}
	count(CNT_ACCEPTED);
	tail_call(skb, CHAIN_ADD);
	return TC_ACT_SHOT; /* only if the chain is not installed */
}
