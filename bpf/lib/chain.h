/* SPDX-License-Identifier: Apache-2.0
 *
 * chain.h: a payload walked by a chain of tail-called programs, one chunk each.
 *
 * Include after the family's two per-CPU maps of one value each: `progress` (what the
 * chain carries from program to program: a chain runs on one CPU without interruption)
 * and `chunk_buf` (the chunk copied out of the packet). The family's tail-call wrapper,
 * `tail_call()`, counts a call that returns (a missed tail call) in its own counter: BCC
 * rewrites a program array's .call() only where the array is named, not in a macro.
 */
#ifndef AGGBOX_CHAIN_H
#define AGGBOX_CHAIN_H

#include "aggbox.h"
#include "lib/parse.h"

/* The chain's state and the chunk buffer of this CPU (NULL: no map value, drop). */
static __always_inline void *get_progress(void)
{
	__u32 zero = 0;
	return progress.lookup(&zero);
}

enum chunk_verdict {
	CHUNK_LOADED = 0, /* *n items copied into *buf */
	CHUNK_NONE,       /* nothing to load: the chain's state is off (the packet is dropped) */
	CHUNK_FAILED,     /* *n items were due but could not be read from the packet */
};

/* Copy the payload's items first .. first + n - 1 (n = min(total - first, chunk), items
 * of `item` bytes, at most max_total of them) out of the packet, linear or not, into
 * this CPU's chunk_buf, returned in *buf. `len_mask`: a power of two above
 * chunk * item, minus 1: it only restates n <= chunk in a form the verifier tracks
 * (clang would drop a plain bound as implied by n). */
static __always_inline int load_chunk(struct __sk_buff *skb, __u32 first, __u32 total,
				      __u32 max_total, __u32 item, __u32 chunk, __u32 len_mask,
				      void **buf, __u32 *n)
{
	__u32 zero = 0;
	void *b = chunk_buf.lookup(&zero);
	if (!b || first >= total || total > max_total)
		return CHUNK_NONE;
	__u32 left = total - first;
	__u32 len = (left > chunk ? chunk : left) * item;
	barrier_var(len);
	len &= len_mask;
	if (len < item || len > chunk * item)
		return CHUNK_NONE;
	*buf = b;
	*n = left > chunk ? chunk : left;
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF + first * item, b, len) != 0)
		return CHUNK_FAILED;
	return CHUNK_LOADED;
}

#endif /* AGGBOX_CHAIN_H */
