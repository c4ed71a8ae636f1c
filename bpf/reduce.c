/* SPDX-License-Identifier: Apache-2.0
 *
 * reduce.c: in-kernel reduce-by-key. Mappers send (key, int64 value) pairs, many to a
 * packet; the reducer's kernel sums them into a BPF hash map and answers with an ACK made
 * from the packet itself, so the reducer's application never sees per-pair traffic.
 *
 * The packet's path, on the reducer's TC ingress (priority 3):
 *
 *   kv_ingress  parse, check (magic, version, type, job, token, member, length), then
 *               claim (sender, seq) in the dedup ring:
 *                 new       -> progress into the per-CPU map, tail call kv_walk
 *                 taken     -> a retransmission: ACK again, add nothing
 *                 spilled   -> a retransmission of a spilled packet: up again (the
 *                              application merges each (sender, seq) once)
 *                 in flight -> another CPU is adding this seq right now: drop (resent)
 *                 older than the ring -> acknowledged long ago: drop
 *   kv_walk x N adds KV_CHUNK pairs per program and tail-calls itself for the next
 *               chunk: ceil(count / KV_CHUNK) programs, the progress in a per-CPU map
 *   finish      counts the seq in `streams` (taken or spilled, once per seq); every
 *               pair taken: the packet becomes a KV_ACK, redirected out of the same
 *               interface (TC_ACT_REDIRECT); some pair not taken (map full, update failed,
 *               broken chain): the packet goes up to the reducer's socket as a KV_SPILL,
 *               and the dedup ring says which pairs (bit i: pair i not taken)
 *
 * Pairs with keys longer than AGGBOX_KV_KEY_WIDTH come in AGGBOX_F_KV_LONG packets and go
 * up whole. DONE messages (AGGBOX_F_KV_DONE) and KV_ACKs go up after the checks.
 *
 * Where the sums live: `keydir`, a BPF hash map from the full key (job slot, the key's 16
 * bytes: keys are compared in full, never by hash alone) to an entry number, and
 * `entries`, an mmap-able array of (key, sum, state) per job slot. A new key takes the
 * next entry of its job (an atomic counter in `alloc`), writes key and value there, then
 * publishes the number in `keydir`; later pairs of that key add to the entry atomically.
 * The reducer's application maps `entries` into its memory: it learns new keys while the
 * shuffle runs and, once every mapper is done, snapshots the sums with one memory copy
 * instead of walking a hash map (BPF_MAP_LOOKUP_BATCH costs ~140 ns per key here).
 *
 * Why a ring per sender and not a window: the sender never has more than KV_RING packets
 * unacknowledged, so the slot of seq s is reused (by s + KV_RING) only once s was taken
 * or merged; a copy of s that finds a newer seq in its slot is therefore stale.
 *
 * TC verdicts: TC_ACT_UNSPEC for packets that are not ours (other ports, other hosts'
 * frames), so other families' filters on the same hook still see them.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#ifndef KV_MAP_ENTRIES
#define KV_MAP_ENTRIES 131072 /* distinct keys the kernel holds per job */
#endif
#ifndef KV_CHUNK
#define KV_CHUNK 16 /* pairs one program of the chain walks; a power of two */
#endif
#ifndef KV_RING_SHIFT
#define KV_RING_SHIFT 7 /* 128 packets per sender: the largest sender window */
#endif
#ifndef KV_MAX_JOBS
#define KV_MAX_JOBS 4 /* < AGGBOX_MAX_JOBS: each job slot holds KV_MAP_ENTRIES entries */
#endif
#define JOB_SLOTS KV_MAX_JOBS
#define KV_RING (1u << KV_RING_SHIFT)
#define KV_EEXIST 17

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/check.h"
#include "lib/csum.h"
#include "lib/reply.h"

_Static_assert((KV_CHUNK & (KV_CHUNK - 1)) == 0, "KV_CHUNK must be a power of two");
_Static_assert(KV_CHUNK <= AGGBOX_KV_MAX_PAIRS, "KV_CHUNK: at most a packet");
_Static_assert(AGGBOX_KV_MAX_PAIRS / KV_CHUNK <= 32, "the chain would exceed 33 tail calls");

/* ---------------------------------------------------------------- maps -------------- */

/* `config` (ports) and `members` (key: job slot * AGGBOX_MAX_MEMBERS + rank):
 * lib/check.h */

/* user space puts kv_walk at index 0 */
BPF_PROG_ARRAY(kv_chain, 1);

struct kv_job {
	AGGBOX_JOB_PREFIX;
};
BPF_HASH(jobs, __u32, struct kv_job, JOB_SLOTS);

enum kv_state { KV_EMPTY = 0, KV_BUSY = 1, KV_TAKEN = 2, KV_SPILLED = 3, KV_STALE = 4 };

/* A BUSY tag also holds when it was claimed (ms, 24 bits, above the seq): a chain that
 * died without finishing (a wrong program in kv_chain, an aborted walk) would otherwise
 * leave its seq BUSY for ever and every resend dropped as "in progress". */
#define KV_TAG_SEQ(t) ((__u32)((t) >> 8))
#define KV_BUSY_TIMEOUT_MS 200 /* a chain runs in microseconds; resends come every ms */
struct kv_seen {
	__u64 tag;   /* seq << 8 | enum kv_state (BUSY: | claim ms << 40), compare-and-swap */
	__u64 spill; /* KV_SPILLED: bit i set = pair i was NOT taken (the application's part) */
};
/* key: (job slot * AGGBOX_MAX_MEMBERS + sender rank) * KV_RING + seq % KV_RING */
BPF_ARRAY(seen, struct kv_seen, JOB_SLOTS * AGGBOX_MAX_MEMBERS * KV_RING);

struct kv_key {
	__u32 slot; /* the job slot */
	__u32 pad;
	__u8 key[AGGBOX_KV_KEY_WIDTH];
};
/* the key directory: full key -> entry number inside the job's part of `entries`. A job's
 * keys leave it when its sums were read, so two jobs' worth is enough; the per-job limit
 * is `alloc`'s. */
BPF_HASH(keydir, struct kv_key, __u32, KV_MAP_ENTRIES * 2);

enum kv_entry_state { KV_ENTRY_FREE = 0, KV_ENTRY_VALID = 1, KV_ENTRY_WASTED = 2 };
struct kv_entry {
	__u8 key[AGGBOX_KV_KEY_WIDTH];
	__s64 value;
	__u64 state; /* enum kv_entry_state: VALID once `keydir` points here */
};
/* key: job slot * KV_MAP_ENTRIES + entry number; mapped into the reducer's memory */
BPF_F_TABLE("array", __u32, struct kv_entry, entries, KV_MAP_ENTRIES * JOB_SLOTS,
	    BPF_F_MMAPABLE);
/* per job slot: entries handed out so far (may pass KV_MAP_ENTRIES: those inserts failed) */
BPF_ARRAY(alloc, __u64, JOB_SLOTS);

/* Per (job slot, sender): packets finished, each seq once. With the packet count a DONE
 * announces, the reducer's application knows from these alone that its kernel has taken
 * (or spilled) everything, without waiting for the sender's ACK round trips. */
struct kv_stream {
	__u64 taken;   /* every pair in the map */
	__u64 spilled; /* some pair passed up as KV_SPILL */
};
/* key: job slot * AGGBOX_MAX_MEMBERS + sender rank */
BPF_ARRAY(streams, struct kv_stream, JOB_SLOTS * AGGBOX_MAX_MEMBERS);

/* What one packet's chain carries from program to program (lib/chain.h). */
struct kv_progress {
	__u32 seen_key;
	__u32 stream_key; /* job slot * AGGBOX_MAX_MEMBERS + sender rank */
	__u32 slot;       /* the job slot */
	__u32 seq;
	__u32 my_rank;
	__u32 next;  /* the next pair to add */
	__u32 count; /* pairs in the packet */
	__u64 spill; /* pairs not taken so far */
	__u32 spilled;
};
BPF_PERCPU_ARRAY(progress, struct kv_progress, 1);

struct kv_chunk_buf {
	struct aggbox_kv_pair p[KV_CHUNK];
};
BPF_PERCPU_ARRAY(chunk_buf, struct kv_chunk_buf, 1);

/* lib/chain.h reads `progress` and `chunk_buf`: included after them */
#include "lib/chain.h"

/* ---------------------------------------------------------------- parse and check --- */

/* Bits first .. count - 1 set (count <= 64). */
static __always_inline __u64 bits_from(__u32 first, __u32 count)
{
	__u64 all = count >= 64 ? ~0ULL : (1ULL << count) - 1;
	__u64 below = first >= 64 ? ~0ULL : (1ULL << first) - 1;
	return all & ~below;
}

/* The sender's checks (lib/check.h; KV_SPILL refused: only this program makes them),
 * then the packet's length. Returns the job, or NULL with *reason set. */
static __always_inline struct kv_job *check_packet(struct __sk_buff *skb, struct pkt *p,
						   int *reason)
{
	__u32 job_id = p->hdr->job_id;
	struct kv_job *job = (void *)check_sender(p, jobs.lookup(&job_id),
						  TYPE_BIT(AGGBOX_KV) | TYPE_BIT(AGGBOX_KV_ACK),
						  SELF_NEVER_SENDS, reason);
	if (!job || p->hdr->type == AGGBOX_KV_ACK)
		return job;
	__u32 n = p->hdr->count;
	__u16 flags = p->hdr->flags;
	if (flags & AGGBOX_F_KV_DONE)
		return job;
	/* A LONG packet's pairs are variable-length: the application checks them. */
	__u32 bytes = (flags & AGGBOX_F_KV_LONG) ? 1 : n * sizeof(struct aggbox_kv_pair);
	if (n == 0 || n > AGGBOX_KV_MAX_PAIRS || !payload_fits(skb->len, p, bytes)) {
		*reason = CNT_DROP_TRUNCATED;
		return NULL;
	}
	return job;
}

/* Claim seq in its ring slot. Returns KV_EMPTY when this packet is the first copy (the
 * slot is now KV_BUSY and ours), else the state of the copy that came first. */
static __always_inline int claim(struct kv_seen *s, __u32 seq)
{
	__u64 now_ms = (bpf_ktime_get_ns() / 1000000) & 0xffffff;
	__u64 want = (now_ms << 40) | ((__u64)seq << 8) | KV_BUSY;
#pragma clang loop unroll(disable)
	for (int i = 0; i < 4; i++) {
		__u64 old = s->tag;
		__u32 old_seq = KV_TAG_SEQ(old);
		if (old_seq == seq) {
			__u32 state = old & 0xff;
			if (state == KV_BUSY && ((now_ms - (old >> 40)) & 0xffffff) > KV_BUSY_TIMEOUT_MS) {
				/* Its chain died: this copy takes the seq over (one copy wins the swap). */
				if (__sync_val_compare_and_swap(&s->tag, old, want) == old) {
					count(CNT_KV_BUSY_RECLAIMED);
					return KV_EMPTY;
				}
				continue;
			}
			return state == KV_EMPTY ? KV_STALE : state; /* seq 0 is never sent */
		}
		if (old_seq > seq)
			return KV_STALE;
		if (__sync_val_compare_and_swap(&s->tag, old, want) == old)
			return KV_EMPTY;
	}
	return KV_BUSY; /* contended: the sender will resend */
}

/* ---------------------------------------------------------------- act --------------- */

/* Turn the packet into a bare-header KV_ACK for its sender and send it back out of the
 * interface it came in on. Fields that stay: job_id, token, seq. */
static __always_inline int make_ack(struct __sk_buff *skb, __u32 my_rank)
{
	if (reply_header(skb, AGGBOX_KV_ACK, my_rank, 0) != 0) {
		count(CNT_ACK_ERRORS);
		return TC_ACT_SHOT;
	}
	count(CNT_ACK_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

/* Pass the packet up to the reducer's socket as a KV_SPILL (which pairs: the ring). */
static __always_inline int spill_up(struct __sk_buff *skb)
{
	__u16 old_word, new_word; /* version and type share a 16-bit checksum word */
	if (bpf_skb_load_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, version), &old_word, 2))
		return TC_ACT_SHOT;
	new_word = (old_word & 0x00ff) | ((__u16)AGGBOX_KV_SPILL << 8);
	bpf_l4_csum_replace(skb, UDP_CHECK_OFF, old_word, new_word, BPF_F_MARK_MANGLED_0 | 2);
	bpf_skb_store_bytes(skb, HDR_OFF + offsetof(struct aggbox_hdr, version), &new_word, 2, 0);
	count(CNT_KV_SPILL_PACKETS);
	return TC_ACT_OK;
}

/* The chain's end: record the outcome in the ring, then ACK or spill. */
static __always_inline int finish(struct __sk_buff *skb, struct kv_progress *pr)
{
	__u32 key = pr->seen_key;
	struct kv_seen *s = seen.lookup(&key);
	if (!s)
		return TC_ACT_SHOT;
	__u64 spill = pr->spill;
	s->spill = spill;
	__u64 tag = ((__u64)pr->seq << 8) | (spill ? KV_SPILLED : KV_TAKEN);
	__sync_lock_test_and_set(&s->tag, tag);
	__u32 skey = pr->stream_key;
	struct kv_stream *st = streams.lookup(&skey);
	if (st) {
		if (spill)
			__sync_fetch_and_add(&st->spilled, 1);
		else
			__sync_fetch_and_add(&st->taken, 1);
	}
	if (!spill)
		return make_ack(skb, pr->my_rank);
	count_n(CNT_KV_SPILLED, pr->spilled);
	return spill_up(skb);
}

/* Add v to the entry `keydir` names for k. Returns 1 when done, 0 when k is not there. */
static __always_inline int add_existing(struct kv_key *k, __s64 v)
{
	__u32 *num = keydir.lookup(k);
	if (!num)
		return 0;
	__u32 at = k->slot * KV_MAP_ENTRIES + (*num % KV_MAP_ENTRIES);
	struct kv_entry *e = entries.lookup(&at);
	if (!e)
		return 0;
	__sync_fetch_and_add(&e->value, v);
	return 1;
}

/* Add v to key k. Returns 1 when taken, 0 when the kernel cannot hold it (spilled). */
static __always_inline int add_pair(struct kv_key *k, __s64 v)
{
	if (add_existing(k, v))
		return 1;
	__u32 slot = k->slot;
	__u64 *next = alloc.lookup(&slot);
	if (!next)
		return 0;
	__u64 num = __sync_fetch_and_add(next, 1);
	if (num >= KV_MAP_ENTRIES) {
		count(CNT_KV_UPDATE_FAILED); /* the job's entries are all taken: map full */
		return 0;
	}
	__u32 at = slot * KV_MAP_ENTRIES + (__u32)num;
	struct kv_entry *e = entries.lookup(&at);
	if (!e)
		return 0;
	/* Key and value first: whoever finds the number in `keydir` may add at once. */
	__builtin_memcpy(e->key, k->key, AGGBOX_KV_KEY_WIDTH);
	e->value = v;
	__u32 num32 = num;
	int err = keydir.insert(k, &num32); /* BPF_NOEXIST: never overwrites a concurrent insert */
	if (err == 0) {
		__sync_fetch_and_or(&e->state, KV_ENTRY_VALID);
		return 1;
	}
	/* Another CPU published this key first (or `keydir` is full): give the entry up. */
	e->value = 0;
	__sync_fetch_and_or(&e->state, KV_ENTRY_WASTED);
	if (err == -KV_EEXIST && add_existing(k, v))
		return 1;
	count(CNT_KV_UPDATE_FAILED);
	return 0;
}

/* Add the n pairs of `buf` (pairs first .. first + n - 1 of the packet); returns the
 * spill bits of those not taken, and their number in *spilled. */
static __always_inline __u64 add_pairs(struct kv_chunk_buf *buf, __u32 slot, __u32 first,
				       __u32 n, __u32 *spilled)
{
	__u64 spill = 0;
	__u32 added = 0;
	struct kv_key k = {};
	k.slot = slot;
	/* Hidden from clang: it would otherwise drop `i < KV_CHUNK` as implied by n, and the
	 * verifier, which cannot see that, walks the loop until it gives up. */
	barrier_var(n);
#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (__u32 i = 0; i < KV_CHUNK; i++) {
		if (i >= n)
			break;
		__u32 j = i;
		barrier_var(j); /* keep clang from turning the index into a pointer walk */
		j &= KV_CHUNK - 1;
		__builtin_memcpy(k.key, buf->p[j].key, AGGBOX_KV_KEY_WIDTH);
		if (add_pair(&k, buf->p[j].value)) {
			added++;
		} else {
			spill |= 1ULL << ((first + j) & 63);
			*spilled += 1;
		}
	}
	count_n(CNT_KV_PAIRS, added);
	return spill;
}

/* The pair walk's next program; returns only when the tail call failed. */
static __always_inline void tail_call(struct __sk_buff *skb)
{
	kv_chain.call(skb, 0);
	count(CNT_KV_CHAIN_BROKEN);
}

/* ---------------------------------------------------------------- tail-call targets - */

/* KV_CHUNK pairs into the map, then the next chunk (or finish). */
int kv_walk(struct __sk_buff *skb)
{
	struct kv_progress *pr = get_progress();
	if (!pr)
		return TC_ACT_SHOT;
	struct kv_chunk_buf *buf = NULL;
	__u32 first = pr->next, count_all = pr->count, n = 0, spilled = 0;
	int loaded = load_chunk(skb, first, count_all, AGGBOX_KV_MAX_PAIRS,
				sizeof(struct aggbox_kv_pair), KV_CHUNK,
				KV_CHUNK * 32 - 1 /* a power of two above KV_CHUNK * 24 */,
				(void **)&buf, &n);
	if (loaded == CHUNK_NONE || !buf)
		return TC_ACT_SHOT;
	__u64 spill = pr->spill;
	if (loaded == CHUNK_FAILED) {
		spill |= bits_from(first, first + n);
		spilled = n;
	} else {
		spill |= add_pairs(buf, pr->slot, first, n, &spilled);
	}
	pr->next = first + n;
	pr->spill = spill;
	pr->spilled += spilled;
	if (pr->next < count_all) {
		count(CNT_KV_TAIL_CALLS);
		tail_call(skb);
		/* Only reached when the tail call failed: the rest goes up, never lost. */
		pr->spill |= bits_from(pr->next, count_all);
		pr->spilled += count_all - pr->next;
	}
	return finish(skb, pr);
}

/* ---------------------------------------------------------------- entry points ------ */

/* Check a mapper's packet, claim its seq, and start the pair walk. */
int kv_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	/* Frames for another host's MAC are none of our business; broadcast- and
	 * multicast-MAC frames reach this host's stack, so they are checked (then dropped). */
	int found = find_header((void *)(long)skb->data, (void *)(long)skb->data_end, &p,
				skb->pkt_type == PACKET_OTHERHOST);
	if (found != FIND_OK)
		return found == FIND_NOT_OURS ? TC_ACT_UNSPEC : TC_ACT_SHOT;
	int reason = 0;
	struct kv_job *job = check_packet(skb, &p, &reason);
	if (!job) {
		count(reason);
		return TC_ACT_SHOT;
	}
	if (skb->pkt_type != PACKET_HOST) {
		count(CNT_DROP_NOT_MINE); /* mappers send to the reducer's own MAC, never broadcast */
		return TC_ACT_SHOT;
	}
	/* Pairs are added (and ACKed) here, before the stack verifies anything: a corrupted
	 * packet must not change a sum. */
	if (!ip_csum_ok(p.ip, (void *)(long)skb->data_end) ||
	    !udp_csum_ok(skb, p.ip, p.udp, UDP_OFF)) {
		count(CNT_DROP_BAD_CSUM);
		return TC_ACT_SHOT;
	}
	__u16 flags = p.hdr->flags;
	if (p.hdr->type == AGGBOX_KV_ACK || (flags & AGGBOX_F_KV_DONE)) {
		count(CNT_ACCEPTED);
		return TC_ACT_OK; /* for the application: a mapper's ACKs, a reducer's DONEs */
	}
	__u32 seq = p.hdr->seq, n = p.hdr->count;
	__u32 stream_key = member_key((void *)job, p.hdr->rank);
	__u32 seen_key = stream_key * KV_RING + (seq & (KV_RING - 1));
	struct kv_seen *s = seen.lookup(&seen_key);
	struct kv_progress *pr = get_progress();
	if (!s || !pr)
		return TC_ACT_SHOT;
	/* A sender has at most KV_RING packets unacknowledged and every seq below its lowest
	 * unacknowledged one is finished here, so a real seq is never beyond finished +
	 * KV_RING. One further ahead would take a ring slot from the real seq that maps there
	 * (which then looks stale for ever): refuse it before it touches the ring. */
	struct kv_stream *st = streams.lookup(&stream_key);
	if (!st)
		return TC_ACT_SHOT;
	if (seq == 0 || (__u64)seq > st->taken + st->spilled + KV_RING) {
		count(CNT_KV_OUT_OF_WINDOW);
		return TC_ACT_SHOT;
	}
	int state = claim(s, seq);
	if (state == KV_TAKEN) {
		count(CNT_KV_DUPLICATE);
		return make_ack(skb, job->my_rank); /* the first ACK may have been lost */
	}
	if (state == KV_SPILLED) {
		count(CNT_KV_DUPLICATE);
		return spill_up(skb); /* the application merges each (sender, seq) once */
	}
	if (state == KV_BUSY) {
		count(CNT_KV_IN_PROGRESS);
		return TC_ACT_SHOT;
	}
	if (state == KV_STALE) {
		count(CNT_KV_STALE);
		return TC_ACT_SHOT;
	}
	count(CNT_ACCEPTED);
	pr->seen_key = seen_key;
	pr->stream_key = stream_key;
	pr->slot = job->slot;
	pr->seq = seq;
	pr->my_rank = job->my_rank;
	pr->next = 0;
	pr->count = n;
	pr->spill = 0;
	pr->spilled = 0;
	if (!(flags & AGGBOX_F_KV_LONG)) {
		tail_call(skb);
		/* Only reached when the chain is not installed: everything goes up, never lost. */
	}
	pr->spill = bits_from(0, n);
	pr->spilled = n;
	return finish(skb, pr);
}
