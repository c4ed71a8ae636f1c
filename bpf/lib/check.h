/* SPDX-License-Identifier: Apache-2.0
 *
 * check.h: what every program family does before a packet may touch state: find the
 * AggBox header of a packet to one of the host's AggBox ports, and check its sender
 * against the job (token, job slot, member rank, the member's IP bound to its MAC).
 *
 * The family defines, before including this file, JOB_SLOTS (the jobs it holds at once:
 * the size of its per-job arrays). This file defines the maps every family has: `config`
 * (the ports) and `members` (each job slot's members' addresses); the family defines its
 * `jobs` hash, whose value begins with AGGBOX_JOB_PREFIX.
 */
#ifndef AGGBOX_CHECK_H
#define AGGBOX_CHECK_H

#include "aggbox.h"
#include "lib/parse.h"
#include "lib/maps.h"

#ifndef JOB_SLOTS
#error "define JOB_SLOTS (the family's concurrent jobs) before including lib/check.h"
#endif
_Static_assert(JOB_SLOTS <= AGGBOX_MAX_JOBS, "a family holds at most AGGBOX_MAX_JOBS jobs");

/* ------------------------------------------------------------------ maps ---------- */

struct port_config {
	__u16 port_lo; /* this family's jobs on this host use UDP ports port_lo..port_hi */
	__u16 port_hi;
	__u32 pad;
};
BPF_ARRAY(config, struct port_config, 1);

/* The fields every family's job value begins with (user space fills them by name). */
#define AGGBOX_JOB_PREFIX                                                                  \
	__u32 token;                                                                       \
	__u32 slot;      /* the job slot: this job's part of the per-job arrays */          \
	__u32 n_members; /* ranks 0 .. n_members - 1 */                                     \
	__u32 my_rank    /* this host's rank in the job (an aggregator has none: unused) */

struct job_prefix {
	AGGBOX_JOB_PREFIX;
};

struct member_addr {
	__u32 ip;    /* network order */
	__u8 mac[6]; /* all zero: unknown, not checked */
	__u16 pad;
};
/* key: job slot * AGGBOX_MAX_MEMBERS + rank */
BPF_ARRAY(members, struct member_addr, JOB_SLOTS * AGGBOX_MAX_MEMBERS);

static __always_inline struct port_config *get_config(void)
{
	__u32 zero = 0;
	return config.lookup(&zero);
}

static __always_inline __u32 member_key(const struct job_prefix *job, __u32 rank)
{
	return job->slot * AGGBOX_MAX_MEMBERS + rank;
}

/* ------------------------------------------------------------------ parse --------- */

enum find_verdict {
	FIND_NOT_OURS = 0, /* leave it alone (not to our ports, or not AggBox's: counted) */
	FIND_OK,           /* a whole AggBox header at p->hdr */
	FIND_DROP,         /* ours but malformed: counted here, the caller drops it */
};

/* The one header finder. A datagram to our ports without AggBox's magic is somebody
 * else's: counted and passed. `ignore`: the caller's own reason to leave the frame alone
 * (e.g. another host's MAC), decided before anything is counted. */
static __always_inline int find_header(void *data, void *data_end, struct pkt *p, int ignore)
{
	struct port_config *cfg = get_config();
	if (!cfg)
		return FIND_NOT_OURS;
	int r = parse_aggbox_magic(data, data_end, p, cfg->port_lo, cfg->port_hi);
	if (r == PARSE_NOT_OURS || ignore)
		return FIND_NOT_OURS;
	if (r == PARSE_FOREIGN) {
		count(CNT_PASSED_NOT_OURS);
		return FIND_NOT_OURS;
	}
	if (r != PARSE_OK) {
		count(r == PARSE_TRUNCATED ? CNT_DROP_TRUNCATED : CNT_DROP_IP_OPTIONS);
		return FIND_DROP;
	}
	return FIND_OK;
}

/* ------------------------------------------------------------------ check --------- */

#define TYPE_BIT(t) (1u << (t))
#define ANY_TYPE    0xffffffffu

enum sender_self { SELF_MAY_SEND = 0, SELF_NEVER_SENDS = 1 };

/* The checks every AggBox packet passes before it may touch state: the header itself,
 * its type among `types` (checked before any map), the job (`job`: the family's jobs
 * entry for hdr.job_id, or NULL), its token, the sender's rank (a member, and not this
 * host when `self` says it never sends to itself), the member's IP, and its MAC (a
 * member's IP from another MAC: someone on the bridge spoofing it). Returns the job, or
 * NULL with *reason set to the counter that says why. */
static __always_inline struct job_prefix *check_sender(struct pkt *p, void *job_value,
						       __u32 types, enum sender_self self,
						       int *reason)
{
	int bad = check_hdr(p->hdr);
	if (bad < 0 && !(types & TYPE_BIT(p->hdr->type & 31)))
		bad = CNT_DROP_BAD_TYPE;
	struct job_prefix *job = job_value;
	if (bad < 0 && !job)
		bad = CNT_DROP_UNKNOWN_JOB;
	if (bad < 0 && p->hdr->token != job->token)
		bad = CNT_DROP_BAD_TOKEN;
	if (bad >= 0) {
		*reason = bad;
		return NULL;
	}
	__u32 rank = p->hdr->rank;
	if (rank >= job->n_members || rank >= AGGBOX_MAX_MEMBERS ||
	    (self == SELF_NEVER_SENDS && rank == job->my_rank)) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	__u32 key = member_key(job, rank);
	struct member_addr *m = members.lookup(&key);
	if (!m || m->ip != p->ip->saddr) {
		*reason = CNT_DROP_NON_MEMBER;
		return NULL;
	}
	if (!mac_matches(m->mac, p->eth)) {
		*reason = CNT_DROP_WRONG_MAC;
		return NULL;
	}
	return job;
}

/* Both lengths hold `payload` bytes after the header: the skb's and the one UDP claims
 * (a datagram shorter than its count, padded at the link layer, must not pass). */
static __always_inline int payload_fits(__u32 skb_len, const struct pkt *p, __u32 payload)
{
	__u32 need = PAYLOAD_OFF + payload;
	return skb_len >= need && bpf_ntohs(p->udp->len) >= need - UDP_OFF;
}

#endif /* AGGBOX_CHECK_H */
