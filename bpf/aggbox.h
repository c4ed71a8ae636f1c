/* SPDX-License-Identifier: Apache-2.0
 *
 * aggbox.h: the AggBox wire format, the one source of truth.
 *
 * Every AggBox packet is Ethernet / IPv4 (no options) / UDP / struct aggbox_hdr / payload.
 * All header fields are LITTLE-ENDIAN (both ends and the eBPF programs run on x86/arm64
 * hosts; the kernel programs read them without byte swaps). aggbox/protocol.py mirrors
 * this file and tests/unit/test_protocol.py checks that both agree, field by field.
 */
#ifndef AGGBOX_H
#define AGGBOX_H

#define AGGBOX_MAGIC   0x58424741u /* "AGBX" as little-endian bytes 'A' 'G' 'B' 'X' */
#define AGGBOX_VERSION 1

/* Message types (aggbox_hdr.type). */
enum aggbox_type {
	AGGBOX_DATA      = 1, /* broadcast payload, root -> members (fanned out in the kernel) */
	AGGBOX_ACK       = 2, /* member kernel -> root: cumulative, made in the member's kernel */
	AGGBOX_GROUP_ACK = 3, /* root kernel -> root application: every member has seq <= aux */
	AGGBOX_NACK      = 4, /* member application -> root: resend seq aux .. aux + count - 1 */
	/* 5..6: aggregation (bpf/aggregate.c); 7..9: reduce-by-key (bpf/reduce.c). */
	AGGBOX_AGG        = 5, /* worker -> aggregator: one block of int32 values          */
	AGGBOX_AGG_RESULT = 6, /* aggregator kernel -> workers: the block's sum            */
	AGGBOX_KV         = 7, /* mapper -> reducer: (key, value) pairs                    */
	AGGBOX_KV_ACK     = 8, /* reducer -> mapper: the pairs packet was taken            */
	AGGBOX_KV_SPILL   = 9, /* reducer kernel -> its application: pairs it cannot hold  */
	AGGBOX_TYPE_MAX,
};

/* Flags (aggbox_hdr.flags). */
#define AGGBOX_F_LAST_FRAG  0x0001 /* DATA: last packet of a message */
#define AGGBOX_F_RETRANSMIT 0x0002 /* DATA: a resend (unicast to the members that miss it) */
#define AGGBOX_F_KV_DONE    0x0004 /* KV: the mapper's last message to this reducer, sent
                                    * after its last packet: aux = packets it sent (seq
                                    * 1..aux), which the reducer's kernel counts       */
#define AGGBOX_F_KV_LONG    0x0008 /* KV: variable-length pairs for the reducer's application
                                    * (keys longer than AGGBOX_KV_KEY_WIDTH), see below    */
#define AGGBOX_F_OP_MAX     0x0100 /* AGG: element-wise max instead of sum (scale agreement) */
#define AGGBOX_F_STATUS     0x0200 /* AGG_RESULT that is a status: its payload is the 64-bit
                                    * bitmap of the workers whose block is in (aux: its
                                    * low half)                                          */
#define AGGBOX_F_ALIGN      0x0400 /* AGG: values quantized with each worker's own exponent
                                    * (hdr.scale_exp), each + 2**B (biased, B the job's
                                    * headroom bits): the kernel aligns them to the
                                    * largest before it sums; results carry n * 2**B     */
#define AGGBOX_F_AUTH       0x0800 /* an authenticated job's packet: the 8 bytes after the
                                    * payload are SipHash-2-4 of this header under the
                                    * job's key (lib/siphash.h; aggbox/auth.py)           */

/* The fixed header after UDP. 32 bytes, no implicit padding. */
struct aggbox_hdr {
	__u32 magic;     /*  0: AGGBOX_MAGIC; anything else is not ours: dropped and counted   */
	__u8  version;   /*  4: AGGBOX_VERSION                                                  */
	__u8  type;      /*  5: enum aggbox_type                                                */
	__u16 flags;     /*  6: AGGBOX_F_*                                                      */
	__u32 job_id;    /*  8: the job (collective instance) this packet belongs to           */
	__u32 token;     /* 12: the job's secret; a packet with a wrong token changes nothing  */
	__u32 seq;       /* 16: broadcast: per-(job, sender) packet sequence, starting at 1;
	                  *     aggregation: block number                                      */
	__u16 round;     /* 20: broadcast: fragment index inside its message;
	                  *     aggregation: 0 from a worker; in the aggregator's replies, the
	                  *     job's installation epoch (it changes when the aggregator
	                  *     restarts and its partial sums are lost)                      */
	__u16 rank;      /* 22: the rank of the member that sent this packet                   */
	__u16 count;     /* 24: payload length: bytes (broadcast) or int32 values (aggregation)*/
	__s16 scale_exp; /* 26: aggregation: the block's agreed power-of-two exponent           */
	__u32 aux;       /* 28: DATA: message number; ACK / GROUP_ACK: cumulative seq (every
	                  *     seq <= aux has arrived); NACK: first missing seq               */
};

_Static_assert(sizeof(struct aggbox_hdr) == 32, "aggbox_hdr must be 32 bytes");
_Static_assert(__builtin_offsetof(struct aggbox_hdr, seq) == 16, "seq at 16");
_Static_assert(__builtin_offsetof(struct aggbox_hdr, aux) == 28, "aux at 28");

/* Reduce-by-key payload (type AGGBOX_KV): hdr.count pairs of fixed width, back to back.
 * A key is its bytes, zero-padded to AGGBOX_KV_KEY_WIDTH; keys that are longer, or that
 * contain a zero byte, travel in AGGBOX_F_KV_LONG packets instead, whose pairs are
 * (__u16 key length, key bytes, __s64 value) and which only the application reads.
 * Values are summed as signed 64-bit integers. */
#define AGGBOX_KV_KEY_WIDTH 16
#define AGGBOX_KV_MAX_PAIRS 64 /* per packet: one bit each in the reducer's spill bitmap */
struct aggbox_kv_pair {
	__u8 key[AGGBOX_KV_KEY_WIDTH];
	__s64 value;
};
_Static_assert(sizeof(struct aggbox_kv_pair) == 24, "a pair is 24 bytes");

/* Largest group a program handles: bounds every member loop the verifier walks. */
#ifndef AGGBOX_MAX_MEMBERS
#define AGGBOX_MAX_MEMBERS 64
#endif
/* Concurrent jobs per host and family: job slots in the per-job state arrays. The most
 * any family holds; broadcast holds this many. Aggregation and reduce-by-key hold fewer
 * by default (AGG_MAX_JOBS, KV_MAX_JOBS: 4), since a job slot there is megabytes of
 * chunks or entries; lib/check.h asserts that no family exceeds this. */
#ifndef AGGBOX_MAX_JOBS
#define AGGBOX_MAX_JOBS 16
#endif

/* skb->mark values that tell a program's own clones apart from application packets. */
#define AGGBOX_MARK_FANOUT 0xab0c0001u /* a fan-out copy re-entering the sender's egress  */
#define AGGBOX_MARK_ACK    0xab0c0002u /* a member's copy to be turned into an ACK at egress */

/* Per-CPU counters, one slot per reason: what `aggbox stats` prints.
 * Keep aggbox/protocol.py COUNTERS in the same order. */
enum aggbox_counter {
	CNT_ACCEPTED = 0,      /* passed every check and was acted on                         */
	CNT_DROP_TRUNCATED,    /* shorter than its headers or than hdr.count says             */
	CNT_DROP_BAD_MAGIC,
	CNT_DROP_BAD_VERSION,
	CNT_DROP_BAD_TYPE,
	CNT_DROP_UNKNOWN_JOB,
	CNT_DROP_BAD_TOKEN,
	CNT_DROP_NON_MEMBER,   /* rank out of range, or source address not that rank's        */
	CNT_DROP_IP_OPTIONS,   /* IPv4 header with options or a fragment: not an AggBox packet */
	CNT_FANOUT_COPIES,     /* copies made by the broadcast fan-out                         */
	CNT_FANOUT_ERRORS,     /* bpf_clone_redirect failures                                  */
	CNT_ACK_SENT,          /* ACKs made by a member's kernel                               */
	CNT_ACK_STALE,         /* ACKs that acknowledged nothing new (dropped in the kernel)   */
	CNT_ACK_FOLDED,        /* ACKs that moved a member forward, not yet the whole group    */
	CNT_GROUP_ACK,         /* group-ACKs passed to the root application                    */
	CNT_DATA_DUPLICATE,    /* DATA a member had already acknowledged                       */
	CNT_DATA_OUT_OF_WINDOW,/* DATA too far ahead of the cumulative ACK to be recorded      */
	CNT_ACK_ERRORS,        /* failures while building an ACK                               */
	CNT_NACK,              /* NACKs passed to the root application                         */
	CNT_DROP_NOT_MINE,     /* DATA for this job but another member's address               */
	/* aggregation (bpf/aggregate.c) */
	CNT_AGG_ADDED,         /* blocks added into a slot                                     */
	CNT_AGG_DUPLICATE,     /* a worker's block already counted in its slot (not re-added)  */
	CNT_AGG_COMPLETED,     /* slots completed: the result went to every worker             */
	CNT_AGG_LATE_REPLY,    /* duplicates of a finished block, answered from its copy       */
	CNT_AGG_STATUS,        /* duplicates of an unfinished block, answered with who is missing */
	CNT_AGG_STALE_ROUND,   /* blocks for a round the slot is not at (late or early)        */
	CNT_DROP_GSO,          /* a segmentation-offload super-packet (must be split first)    */
	/* reduce-by-key (bpf/reduce.c) */
	CNT_KV_PAIRS,          /* pairs summed into the reducer's map by its kernel            */
	CNT_KV_SPILLED,        /* pairs passed to the reducer's application instead (map full,
	                        * long key, update failure): merged there, never lost         */
	CNT_KV_SPILL_PACKETS,  /* packets that carried such pairs up                           */
	CNT_KV_UPDATE_FAILED,  /* map inserts that failed (map full, no memory)                 */
	CNT_KV_DUPLICATE,      /* packets already taken: acknowledged again, not added again   */
	CNT_KV_STALE,          /* packets older than the dedup window (long acknowledged)      */
	CNT_KV_IN_PROGRESS,    /* a copy of a packet another CPU is still adding: dropped      */
	CNT_KV_TAIL_CALLS,     /* tail calls of the pair walk                                  */
	CNT_KV_CHAIN_BROKEN,   /* failed tail calls (the rest of the packet was spilled)        */
	/* aggregation, continued */
	CNT_AGG_SHAPE_MISMATCH,/* a block whose count or operation differs from its slot's      */
	CNT_AGG_BAD_SCALE,     /* a block whose scale_exp no quantization produces              */
	/* issue 11: forged traffic and pass-through */
	CNT_PASSED_NOT_OURS,   /* UDP to an AggBox port without AggBox's magic: passed untouched */
	CNT_ACK_BEYOND_SENT,   /* broadcast ACKs for seqs the root's fan-out never sent        */
	CNT_DROP_WRONG_MAC,    /* a member's IP from another MAC than the member's            */
	CNT_KV_OUT_OF_WINDOW,  /* KV seqs beyond what the sender's window allows (ring poison)  */
	CNT_KV_BUSY_RECLAIMED, /* ring slots left BUSY by a chain that died, taken over by a copy */
	CNT_DROP_BAD_CSUM,     /* an IPv4 header or UDP checksum that does not add up          */
	CNT_AGG_CHAIN_BROKEN,  /* failed tail calls of a block's chain (dropped; its
	                        * retransmission completes it)                                */
	CNT_DATA_NO_SOCKET,    /* broadcast DATA for a member with no socket on the port (its
	                        * application ended): not acknowledged                        */
	CNT_DROP_BAD_MAC,      /* an authenticated job's packet without its header's tag     */
	CNT_MAX,
};

#endif /* AGGBOX_H */
