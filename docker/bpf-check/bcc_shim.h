/* SPDX-License-Identifier: Apache-2.0
 *
 * bcc_shim.h: lets plain clang (-target bpf) compile AggBox's BCC-style programs, so that
 * `make image` (and `make bpf-check`) fails on a broken program instead of the experiment.
 *
 * BCC reads `BPF_ARRAY(name, ...)` and `name.lookup(&k)` and rewrites them before clang
 * sees the code. Here each map becomes a real BTF-defined map (SEC(".maps")) plus a
 * `static const` table of function pointers to small always-inline wrappers around the
 * kernel helpers; at -O2 clang folds every `name.method(...)` into a direct helper call, so
 * the result is an ordinary BPF object built from the same source.
 *
 * What passing means: the C is valid for the BPF target with the project's headers and
 * static assertions; helpers, map methods and tail calls are called with the right types;
 * the BPF back end accepts the code (stack within 512 bytes, no unsupported operations).
 * What it does NOT mean: the kernel's verifier accepts it (bounds, loops, spin-lock rules),
 * BCC's own rewriter accepts it (e.g. map calls from an included header, which BCC turns
 * into calls the kernel refuses), or the running kernel has every helper. The kernel tests
 * (tests/kernel) load every program for real.
 */
#ifndef AGGBOX_BCC_SHIM_H
#define AGGBOX_BCC_SHIM_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* libbpf defines these, BCC's helpers.h does not: programs may define their own. */
#undef barrier
#undef barrier_var

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* ---- maps: BPF_TABLE("type", key, leaf, name, size), BPF_F_TABLE(..., flags) and the
 *      shorthands BCC provides */

#define _ABX_MAP_DEF(_map_type, _key_type, _leaf_type, _name, _max, _flags)             \
	struct {                                                                          \
		__uint(type, _map_type);                                                  \
		__type(key, _key_type);                                                   \
		__type(value, _leaf_type);                                                \
		__uint(max_entries, _max);                                                \
		__uint(map_flags, _flags);                                                \
	} _name##__map SEC(".maps");

#define _ABX_TABLE(_map_type, _key_type, _leaf_type, _name, _max, _flags)               \
	_ABX_MAP_DEF(_map_type, _key_type, _leaf_type, _name, _max, _flags)               \
	static __always_inline _leaf_type *_name##__lookup(_key_type *k)                  \
	{ return bpf_map_lookup_elem(&_name##__map, k); }                                 \
	static __always_inline _leaf_type *_name##__lookup_or_try_init(_key_type *k,      \
								       _leaf_type *v)      \
	{                                                                                 \
		_leaf_type *p = bpf_map_lookup_elem(&_name##__map, k);                    \
		if (!p) {                                                                 \
			bpf_map_update_elem(&_name##__map, k, v, BPF_NOEXIST);            \
			p = bpf_map_lookup_elem(&_name##__map, k);                        \
		}                                                                         \
		return p;                                                                 \
	}                                                                                 \
	static __always_inline int _name##__update(_key_type *k, _leaf_type *v)           \
	{ return bpf_map_update_elem(&_name##__map, k, v, BPF_ANY); }                     \
	static __always_inline int _name##__insert(_key_type *k, _leaf_type *v)           \
	{ return bpf_map_update_elem(&_name##__map, k, v, BPF_NOEXIST); }                 \
	static __always_inline int _name##__delete(_key_type *k)                          \
	{ return bpf_map_delete_elem(&_name##__map, k); }                                 \
	static __always_inline void _name##__increment(_key_type k, ...)                  \
	{                                                                                 \
		_leaf_type *p = bpf_map_lookup_elem(&_name##__map, &k);                   \
		if (p)                                                                    \
			__sync_fetch_and_add((__u64 *)p, 1);                              \
	}                                                                                 \
	static __always_inline void _name##__atomic_increment(_key_type k, ...)           \
	{ _name##__increment(k); }                                                        \
	static const struct {                                                             \
		_leaf_type *(*lookup)(_key_type *);                                       \
		_leaf_type *(*lookup_or_try_init)(_key_type *, _leaf_type *);             \
		int (*update)(_key_type *, _leaf_type *);                                 \
		int (*insert)(_key_type *, _leaf_type *);                                 \
		int (*delete)(_key_type *);                                               \
		void (*increment)(_key_type, ...);                                        \
		void (*atomic_increment)(_key_type, ...);                                 \
	} _name = {                                                                       \
		.lookup = _name##__lookup,                                                \
		.lookup_or_try_init = _name##__lookup_or_try_init,                        \
		.update = _name##__update,                                                \
		.insert = _name##__insert,                                                \
		.delete = _name##__delete,                                                \
		.increment = _name##__increment,                                          \
		.atomic_increment = _name##__atomic_increment,                            \
	}

/* BCC names map types with strings ("hash", "percpu_array", ...); clang folds this to a
 * constant (a GNU extension, hence -Wno-gnu-folding-constant in check.sh). Shorter names
 * are tested first, so no index goes past the end of a string. */
#define _ABX_MAP_TYPE(s)                                                                  \
	((s)[0] == 'h' ? BPF_MAP_TYPE_HASH :                                              \
	 (s)[0] == 'a' ? BPF_MAP_TYPE_ARRAY :                                             \
	 (s)[0] == 'l' ? ((s)[4] == 'h' ? BPF_MAP_TYPE_LRU_HASH                           \
				       : BPF_MAP_TYPE_LRU_PERCPU_HASH) :                  \
	 (s)[0] == 'p' && (s)[1] == 'r' ? BPF_MAP_TYPE_PROG_ARRAY :                       \
	 (s)[0] == 'p' ? ((s)[7] == 'a' ? BPF_MAP_TYPE_PERCPU_ARRAY                       \
				       : BPF_MAP_TYPE_PERCPU_HASH) :                      \
	 BPF_MAP_TYPE_UNSPEC)
#define BPF_F_TABLE(_kind, _key, _leaf, _name, _max, _flags) \
	_ABX_TABLE(_ABX_MAP_TYPE(_kind), _key, _leaf, _name, _max, _flags)
#define BPF_TABLE(_kind, _key, _leaf, _name, _max) BPF_F_TABLE(_kind, _key, _leaf, _name, _max, 0)
#define BPF_TABLE_PINNED(_kind, _key, _leaf, _name, _max, _path) \
	BPF_TABLE(_kind, _key, _leaf, _name, _max)

/* BCC's optional-argument forms: BPF_HASH(name), BPF_HASH(name, key), ..., up to 4. */
#define _ABX_PICK(_1, _2, _3, _4, NAME, ...) NAME
#define _ABX_HASH1(n) BPF_TABLE("hash", __u64, __u64, n, 10240)
#define _ABX_HASH2(n, k) BPF_TABLE("hash", k, __u64, n, 10240)
#define _ABX_HASH3(n, k, v) BPF_TABLE("hash", k, v, n, 10240)
#define _ABX_HASH4(n, k, v, s) BPF_TABLE("hash", k, v, n, s)
#define BPF_HASH(...) \
	_ABX_PICK(__VA_ARGS__, _ABX_HASH4, _ABX_HASH3, _ABX_HASH2, _ABX_HASH1)(__VA_ARGS__)
#define _ABX_PHASH1(n) BPF_TABLE("percpu_hash", __u64, __u64, n, 10240)
#define _ABX_PHASH2(n, k) BPF_TABLE("percpu_hash", k, __u64, n, 10240)
#define _ABX_PHASH3(n, k, v) BPF_TABLE("percpu_hash", k, v, n, 10240)
#define _ABX_PHASH4(n, k, v, s) BPF_TABLE("percpu_hash", k, v, n, s)
#define BPF_PERCPU_HASH(...) \
	_ABX_PICK(__VA_ARGS__, _ABX_PHASH4, _ABX_PHASH3, _ABX_PHASH2, _ABX_PHASH1)(__VA_ARGS__)
#define _ABX_LHASH1(n) BPF_TABLE("lru_hash", __u64, __u64, n, 10240)
#define _ABX_LHASH2(n, k) BPF_TABLE("lru_hash", k, __u64, n, 10240)
#define _ABX_LHASH3(n, k, v) BPF_TABLE("lru_hash", k, v, n, 10240)
#define _ABX_LHASH4(n, k, v, s) BPF_TABLE("lru_hash", k, v, n, s)
#define BPF_LRU_HASH(...) \
	_ABX_PICK(__VA_ARGS__, _ABX_LHASH4, _ABX_LHASH3, _ABX_LHASH2, _ABX_LHASH1)(__VA_ARGS__)
#define _ABX_ARRAY1(n) BPF_TABLE("array", int, __u64, n, 10240)
#define _ABX_ARRAY2(n, v) BPF_TABLE("array", int, v, n, 10240)
#define _ABX_ARRAY3(n, v, s) BPF_TABLE("array", int, v, n, s)
#define BPF_ARRAY(...) \
	_ABX_PICK(__VA_ARGS__, _ABX_ARRAY3, _ABX_ARRAY3, _ABX_ARRAY2, _ABX_ARRAY1)(__VA_ARGS__)
#define _ABX_PARRAY1(n) BPF_TABLE("percpu_array", int, __u64, n, 10240)
#define _ABX_PARRAY2(n, v) BPF_TABLE("percpu_array", int, v, n, 10240)
#define _ABX_PARRAY3(n, v, s) BPF_TABLE("percpu_array", int, v, n, s)
#define BPF_PERCPU_ARRAY(...) \
	_ABX_PICK(__VA_ARGS__, _ABX_PARRAY3, _ABX_PARRAY3, _ABX_PARRAY2, _ABX_PARRAY1)(__VA_ARGS__)

/* Tail calls: BPF_PROG_ARRAY(name, size) and name.call(ctx, index). */
#define BPF_PROG_ARRAY(_name, _max)                                                     \
	struct {                                                                          \
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY);                                    \
		__uint(key_size, sizeof(__u32));                                          \
		__uint(value_size, sizeof(__u32));                                        \
		__uint(max_entries, _max);                                                \
	} _name##__map SEC(".maps");                                                      \
	static __always_inline void _name##__call(void *ctx, int index)                   \
	{ bpf_tail_call(ctx, &_name##__map, index); }                                     \
	static const struct { void (*call)(void *, int); } _name = { .call = _name##__call }

/* Redirect maps: BPF_DEVMAP / BPF_CPUMAP / BPF_XSKMAP(name, size), name.redirect_map(i, f). */
#define _ABX_REDIRECT_MAP(_type, _name, _max)                                          \
	struct {                                                                          \
		__uint(type, _type);                                                      \
		__uint(key_size, sizeof(__u32));                                          \
		__uint(value_size, sizeof(__u32));                                        \
		__uint(max_entries, _max);                                                \
	} _name##__map SEC(".maps");                                                      \
	static __always_inline long _name##__redirect_map(int index, int flags)           \
	{ return bpf_redirect_map(&_name##__map, index, flags); }                         \
	static const struct { long (*redirect_map)(int, int); } _name = {                 \
		.redirect_map = _name##__redirect_map }
#define BPF_DEVMAP(_name, _max) _ABX_REDIRECT_MAP(BPF_MAP_TYPE_DEVMAP, _name, _max)
#define BPF_CPUMAP(_name, _max) _ABX_REDIRECT_MAP(BPF_MAP_TYPE_CPUMAP, _name, _max)
#define BPF_XSKMAP(_name, _max) _ABX_REDIRECT_MAP(BPF_MAP_TYPE_XSKMAP, _name, _max)

/* Events to user space: BPF_PERF_OUTPUT(name) / BPF_RINGBUF_OUTPUT(name, pages). */
#define BPF_PERF_OUTPUT(_name)                                                          \
	struct {                                                                          \
		__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);                              \
		__uint(key_size, sizeof(int));                                            \
		__uint(value_size, sizeof(__u32));                                        \
	} _name##__map SEC(".maps");                                                      \
	static __always_inline int _name##__perf_submit(void *ctx, void *data, __u32 size)\
	{ return bpf_perf_event_output(ctx, &_name##__map, BPF_F_CURRENT_CPU, data, size); }\
	static const struct { int (*perf_submit)(void *, void *, __u32); } _name = {      \
		.perf_submit = _name##__perf_submit }
#define BPF_RINGBUF_OUTPUT(_name, _pages)                                               \
	struct {                                                                          \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                                       \
		__uint(max_entries, (_pages) * 4096);                                     \
	} _name##__map SEC(".maps");                                                      \
	static __always_inline int _name##__ringbuf_output(void *d, __u64 s, __u64 f)     \
	{ return bpf_ringbuf_output(&_name##__map, d, s, f); }                            \
	static const struct { int (*ringbuf_output)(void *, __u64, __u64); } _name = {    \
		.ringbuf_output = _name##__ringbuf_output }

/* Small things BCC's helpers.h provides. */
#define lock_xadd(ptr, val) ((void)__sync_fetch_and_add(ptr, val))
#ifndef bpf_trace_printk
#define bpf_trace_printk(fmt, ...) bpf_printk(fmt, ##__VA_ARGS__)
#endif

#endif /* AGGBOX_BCC_SHIM_H */
