/* SPDX-License-Identifier: Apache-2.0
 *
 * maps.h: what every AggBox program family has: the per-CPU drop/accept counters.
 * Include once per program file, after the kernel headers.
 */
#ifndef AGGBOX_MAPS_H
#define AGGBOX_MAPS_H

#include "aggbox.h"

/* One slot per enum aggbox_counter; per-CPU so counting never contends. */
BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);

static __always_inline void count_n(__u32 reason, __u64 n)
{
	__u64 *v = counters.lookup(&reason);
	if (v)
		*v += n;
}

static __always_inline void count(__u32 reason)
{
	count_n(reason, 1);
}

#endif /* AGGBOX_MAPS_H */
