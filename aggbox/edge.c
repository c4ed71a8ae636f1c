/* SPDX-License-Identifier: Apache-2.0
 *
 * edge.c: a worker's hot loops, called through ctypes (aggbox/native.py compiles this
 * file once per machine): the allreduce edge's float32 loops, one pass per block each way
 * (from aggbox/quant.py), and the blocks' socket I/O (from aggbox/collectives/allreduce.py):
 * a window of blocks sent with one sendmmsg, and the plain results taken into place
 * without a Python step per datagram.
 *
 * Every function gives bit for bit what quant.py's numpy path gives, or returns non-zero
 * and writes nothing that the caller keeps: the caller then runs the numpy path, which
 * raises the error (NaN/Inf) or handles the rare case (a scale outside float32's normal
 * range, done in float64 there). tests/unit/test_native_edge.py holds them to that.
 *
 * Why it matches numpy: a block's peak is the largest |x| as float32 bits (the bit
 * patterns of non-negative floats order like the floats), its exponent what np.frexp
 * gives for it; the scale is an exact power of two; x * s is one float32 multiply (exact
 * but in the subnormal range, where it rounds like numpy's), rintf rounds half to even
 * like np.rint, and the cast of an integer-valued float to int32 is exact.
 */
#define _GNU_SOURCE /* sendmmsg */
#include <errno.h>
#include <linux/types.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "aggbox.h" /* bpf/aggbox.h: the wire header, as the kernel programs see it */

#define ZERO_BLOCK_EXPONENT (-200) /* quant.ZERO_BLOCK_EXPONENT */
#define ABS_BITS 0x7fffffffu
#define NONFINITE_BITS 0x7f800000u /* |x| bits from here on: Inf or NaN */
#define MIN_NORMAL_K (-126)        /* 2**k is a normal float32 for k in [-126, 127] */
#define MAX_NORMAL_K 127

enum { EDGE_OK = 0, EDGE_NONFINITE = 1, EDGE_OUT_OF_RANGE = 2 };

static inline float pow2(int k)
{
	uint32_t bits = (uint32_t)(k + 127) << 23;
	float f;
	memcpy(&f, &bits, sizeof(f));
	return f;
}

static inline int clamp_k(int k)
{
	return k < MIN_NORMAL_K ? MIN_NORMAL_K : k > MAX_NORMAL_K ? MAX_NORMAL_K : k;
}

/* np.frexp's exponent of a float32 peak given as |x| bits: peak < 2**e, the smallest e. */
static int exponent_of(uint32_t peak)
{
	if (peak == 0)
		return ZERO_BLOCK_EXPONENT;
	uint32_t biased = peak >> 23;
	if (biased)
		return (int)biased - 126;
	return (32 - __builtin_clz(peak)) - 149; /* subnormal: mantissa * 2**-149 */
}

static inline int64_t block_end(int64_t lo, int64_t block, int64_t size)
{
	return lo + block < size ? lo + block : size;
}

static inline int64_t blocks_of(int64_t size, int64_t block)
{
	return size ? (size + block - 1) / block : 1; /* quant.n_blocks */
}

static void scale_rint(const float *x, int64_t lo, int64_t hi, float s, int32_t bias,
		       int32_t *q)
{
	for (int64_t i = lo; i < hi; i++)
		q[i] = (int32_t)rintf(x[i] * s) + bias;
}

static int quantize_own(const float *x, int64_t size, int64_t block, int bits,
			int32_t bias, int32_t *q, int32_t *exps);

/* Aligned mode: per block its peak, its own exponent into exps, q = rint(x * 2**(bits -
 * e)). The block is still in L1/L2 for the second loop. */
int aggbox_quantize_own_f32(const float *x, int64_t size, int64_t block, int bits,
			    int32_t *q, int32_t *exps)
{
	return quantize_own(x, size, block, bits, 0, q, exps);
}

/* ... + bias on every value (a fused call's biased blocks) */
static int quantize_own(const float *x, int64_t size, int64_t block, int bits,
			int32_t bias, int32_t *q, int32_t *exps)
{
	const uint32_t *xu = (const uint32_t *)x;
	for (int64_t b = 0, n = blocks_of(size, block); b < n; b++) {
		int64_t lo = b * block, hi = block_end(lo, block, size);
		uint32_t peak = 0;
		for (int64_t i = lo; i < hi; i++) {
			uint32_t a = xu[i] & ABS_BITS;
			peak = a > peak ? a : peak;
		}
		if (peak >= NONFINITE_BITS)
			return EDGE_NONFINITE;
		int e = exponent_of(peak), k = bits - e;
		if (peak && (k < MIN_NORMAL_K || k > MAX_NORMAL_K))
			return EDGE_OUT_OF_RANGE;
		exps[b] = e;
		scale_rint(x, lo, hi, pow2(clamp_k(k)), bias, q);
	}
	return EDGE_OK;
}

/* Any live block (not all zero) whose 2**(sign * (bits - e)) is not a normal float32. */
static int out_of_range(const int32_t *exps, int64_t n, int bits, int sign)
{
	for (int64_t b = 0; b < n; b++) {
		int k = sign * (bits - exps[b]);
		if (exps[b] > ZERO_BLOCK_EXPONENT && (k < MIN_NORMAL_K || k > MAX_NORMAL_K))
			return 1;
	}
	return 0;
}

/* Agreed exponents (two-round mode): q = rint(x * 2**(bits - e)); the caller checked the
 * peaks against them. */
int aggbox_quantize_f32(const float *x, int64_t size, int64_t block, int bits,
			const int32_t *exps, int32_t *q)
{
	int64_t n = blocks_of(size, block);
	if (out_of_range(exps, n, bits, 1))
		return EDGE_OUT_OF_RANGE;
	for (int64_t b = 0; b < n; b++) {
		int64_t lo = b * block;
		scale_rint(x, lo, block_end(lo, block, size), pow2(clamp_k(bits - exps[b])), 0, q);
	}
	return EDGE_OK;
}

/* y = float(q - bias) * 2**(e - bits), then / n_mean when n_mean > 1 (a mean): the same
 * two float32 roundings, in the same order, as quant.dequantize_into; the subtraction
 * wraps like numpy's int32 (a biased sum may sit at 2**31). */
static void dequantize_block(const int32_t *q, int64_t lo, int64_t hi, int e, int bits,
			     int32_t n_mean, uint32_t bias, float *y)
{
	float s = pow2(clamp_k(e - bits)), d = (float)n_mean;
	if (n_mean > 1) {
		for (int64_t i = lo; i < hi; i++)
			y[i] = ((float)(int32_t)((uint32_t)q[i] - bias) * s) / d;
	} else {
		for (int64_t i = lo; i < hi; i++)
			y[i] = (float)(int32_t)((uint32_t)q[i] - bias) * s;
	}
}

int aggbox_dequantize_f32(const int32_t *q, int64_t size, int64_t block, int bits,
			  const int32_t *exps, int32_t n_mean, float *y)
{
	int64_t n = blocks_of(size, block);
	if (out_of_range(exps, n, bits, -1))
		return EDGE_OUT_OF_RANGE;
	for (int64_t b = 0; b < n; b++) {
		int64_t lo = b * block;
		dequantize_block(q, lo, block_end(lo, block, size), exps[b], bits, n_mean, 0, y);
	}
	return EDGE_OK;
}

/* ------------------------------------------------------------------ block I/O ----- */

/* One call's blocks as the socket loops see them (aggbox/native.py: BlockIO). Block i
 * is header i, its values values[i * block, min((i + 1) * block, size)) and, for an
 * authenticated job, tag i; its result goes to out at the same place. */
struct aggbox_blocks {
	uint8_t *headers;       /* n_blocks rows of struct aggbox_hdr */
	int32_t *values;
	int32_t *out;
	int32_t *out_exp;       /* each result's scale exponent */
	uint8_t *done;          /* 1 once block i's result is in out */
	int64_t block, size, n_blocks;
	uint32_t base;          /* seq of block 0 */
	uint32_t aggregator_ip; /* network order: the only source of results */
	uint16_t aggregator_port; /* network order: where blocks go */
	uint16_t pad;
	uint32_t job_id, token;
	int32_t epoch;          /* the aggregator's installation; -1: not known yet */
	/* A fused float32 call (aggbox_quantize_call): each result dequantized into y as it
	 * is taken, while in cache; NULL: the caller dequantizes. */
	float *y;
	int32_t bits, n_mean;   /* quant.headroom_bits; n_mean > 1: y is the mean */
	int64_t dequantized;    /* results dequantized into y */
	int32_t deq_failed;     /* a result's scale is not a normal float32: the caller
				 * dequantizes the whole call again (numpy's float64 path) */
	int32_t n_workers;      /* aligned blocks are biased: each value + 2**bits is sent,
				 * each result carries n_workers * 2**bits (bpf/aggregate.c) */
	int32_t pad2;
	/* An authenticated job (aggbox/auth.py): each block's tag, 8 bytes per block, sent
	 * after its values, and the key every result's tag is checked under; NULL: none.
	 * Its results must land in a buffer of their own (out != values): a forged one is
	 * received into place before its tag is refused. */
	uint8_t *tags;
	uint64_t k0, k1;
};

/* ---- SipHash-2-4 of a 32-byte header, as aggbox/auth.py and bpf/lib/siphash.h ---- */

static inline uint64_t rotl64(uint64_t x, int b)
{
	return (x << b) | (x >> (64 - b));
}

#define SIP_ROUND(v0, v1, v2, v3)                                                     \
	do {                                                                          \
		v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32);         \
		v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                              \
		v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                              \
		v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32);         \
	} while (0)

uint64_t aggbox_header_tag(uint64_t k0, uint64_t k1, const void *header)
{
	uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
	uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
	const uint8_t *b = header;
	for (int i = 0; i < 5; i++) {
		uint64_t m = (uint64_t)32 << 56; /* the last word: the length */
		if (i < 4) {
			m = 0;
			for (int k = 7; k >= 0; k--) /* little-endian, whatever the host */
				m = m << 8 | b[8 * i + k];
		}
		v3 ^= m;
		SIP_ROUND(v0, v1, v2, v3);
		SIP_ROUND(v0, v1, v2, v3);
		v0 ^= m;
	}
	v2 ^= 0xff;
	for (int r = 0; r < 4; r++)
		SIP_ROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

static inline uint64_t tag_of(const uint8_t t[8])
{
	uint64_t v = 0;
	for (int k = 7; k >= 0; k--)
		v = v << 8 | t[k];
	return v;
}

#define SEND_BATCH 64

/* A fused float32 call's edge before anything is sent: x quantized block by block into
 * the send buffer (c->values) with each block's own exponent, which goes into its header
 * with its seq (c->base + i); each value biased by 2**bits (struct aggbox_blocks). EDGE_NONFINITE or EDGE_OUT_OF_RANGE: nothing may be sent,
 * the caller takes quant.py's path (which raises, or scales in float64). */
int aggbox_quantize_call(const float *x, struct aggbox_blocks *c)
{
	int32_t exps[1]; /* per block, written to its header as soon as it is known */
	struct aggbox_hdr *h = (struct aggbox_hdr *)c->headers;
	for (int64_t b = 0; b < c->n_blocks; b++) {
		int64_t lo = b * c->block, hi = block_end(lo, c->block, c->size);
		int r = quantize_own(x + lo, hi - lo, hi - lo, c->bits, 1 << c->bits,
				     c->values + lo, exps);
		if (r != EDGE_OK)
			return r;
		h[b].seq = c->base + (uint32_t)b;
		h[b].scale_exp = (int16_t)exps[0];
		if (c->tags) { /* the header is final: its tag, little-endian */
			uint64_t t = aggbox_header_tag(c->k0, c->k1, &h[b]);
			for (int k = 0; k < 8; k++)
				c->tags[8 * b + k] = (uint8_t)(t >> (8 * k));
		}
	}
	return EDGE_OK;
}

static inline int64_t span_of(const struct aggbox_blocks *c, int64_t i, int64_t *lo)
{
	*lo = i * c->block;
	return block_end(*lo, c->block, c->size) - *lo;
}

/* Send blocks idx[0 .. count) (idx NULL: first .. first + count), SEND_BATCH per
 * sendmmsg. Returns 0, or -errno (EINTR is retried: nothing is sent twice). */
int aggbox_send_blocks(int fd, const struct aggbox_blocks *c, const int64_t *idx,
		       int64_t first, int64_t count)
{
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = c->aggregator_port,
				  .sin_addr = {.s_addr = c->aggregator_ip}};
	struct mmsghdr msgs[SEND_BATCH];
	struct iovec iov[SEND_BATCH][3];
	for (int64_t sent = 0; sent < count;) {
		int n = count - sent < SEND_BATCH ? (int)(count - sent) : SEND_BATCH;
		for (int k = 0; k < n; k++) {
			int64_t i = idx ? idx[sent + k] : first + sent + k, lo;
			int64_t len = span_of(c, i, &lo);
			iov[k][0] = (struct iovec){(void *)(c->headers + i * sizeof(struct aggbox_hdr)),
						   sizeof(struct aggbox_hdr)};
			iov[k][1] = (struct iovec){(void *)(c->values + lo), (size_t)len * 4};
			if (c->tags)
				iov[k][2] = (struct iovec){(void *)(c->tags + 8 * i), 8};
			msgs[k] = (struct mmsghdr){.msg_hdr = {.msg_name = &dst,
							       .msg_namelen = sizeof(dst),
							       .msg_iov = iov[k],
							       .msg_iovlen = c->tags ? 3 : 2}};
		}
		int r = sendmmsg(fd, msgs, n, 0);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		sent += r;
	}
	return 0;
}

/* Is the peeked datagram (n bytes from src) a result this loop takes: from the
 * aggregator, the job's, of the known epoch, not a status, for a block of this call
 * still without its result, with that block's count and all its values? Anything else
 * is left queued for the caller, which refuses it, counts it or learns from it. */
static int plain_result(const struct aggbox_blocks *c, const struct aggbox_hdr *h,
			ssize_t n, uint32_t src, int64_t *i, int64_t *lo, int64_t *len)
{
	if (n < (ssize_t)sizeof(*h) || src != c->aggregator_ip)
		return 0;
	if (h->magic != AGGBOX_MAGIC || h->version != AGGBOX_VERSION ||
	    h->type != AGGBOX_AGG_RESULT || h->job_id != c->job_id || h->token != c->token ||
	    (h->flags & AGGBOX_F_STATUS) || c->epoch < 0 || h->round != (uint32_t)c->epoch)
		return 0;
	*i = (uint32_t)(h->seq - c->base); /* a call may straddle the seq wrap */
	if (*i >= c->n_blocks || c->done[*i])
		return 0;
	*len = span_of(c, *i, lo);
	return h->count == *len && n >= (ssize_t)(sizeof(*h) + *len * 4 + (c->tags ? 8 : 0));
}

/* TAKE_REFUSED: an authenticated job's result whose tag is not its header's (taken off
 * the queue and counted; its values, received into their slice, are overwritten when
 * the real result comes) */
enum { TAKE_EMPTY = 0, TAKE_OTHER = 1, TAKE_ONE = 2, TAKE_REFUSED = 3 };

/* Take the queued datagram if it is a plain result: its header peeked, then header and
 * values received in one recvmsg, the values straight into out. TAKE_ONE (*i: its
 * block), TAKE_EMPTY (nothing queued), TAKE_OTHER (left queued), or -errno. */
static int take_one(int fd, const struct aggbox_blocks *c, int64_t *i)
{
	for (;;) {
		struct aggbox_hdr h;
		struct sockaddr_in src;
		socklen_t slen = sizeof(src);
		ssize_t n = recvfrom(fd, &h, sizeof(h), MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT,
				     (struct sockaddr *)&src, &slen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN || errno == EWOULDBLOCK ? TAKE_EMPTY : -errno;
		}
		int64_t lo, len;
		if (!plain_result(c, &h, n, src.sin_addr.s_addr, i, &lo, &len))
			return TAKE_OTHER;
		uint8_t tag[8];
		struct iovec iov[3] = {{&h, sizeof(h)}, {c->out + lo, (size_t)len * 4},
				       {tag, sizeof(tag)}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = c->tags ? 3 : 2};
		if (recvmsg(fd, &m, MSG_DONTWAIT) < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
				continue;
			return -errno;
		}
		if (c->tags && tag_of(tag) != aggbox_header_tag(c->k0, c->k1, &h))
			return TAKE_REFUSED;
		c->out_exp[*i] = h.scale_exp;
		c->done[*i] = 1;
		return TAKE_ONE;
	}
}

/* A call's progress, shared by the run loop and the caller (aggbox/native.py: Progress),
 * which keeps everything that is not the steady state: resends after a timeout, status
 * replies, refusals, the give-up. */
struct aggbox_progress {
	double *sent_at;      /* each block's first send, CLOCK_MONOTONIC s (time.monotonic) */
	uint8_t *resent;      /* sent again: its round trip is no RTT sample (Karn) */
	uint8_t *fast_resent; /* resent once already for a gap below later results */
	int64_t low;          /* every block below has its result */
	int64_t next_send;    /* blocks below were sent */
	int64_t pool;         /* the window: block i goes once every block < i - pool + 1 is in */
	int64_t fast_gap;     /* FAST_RESEND_GAP */
	double spin_s;        /* busy-poll this long before sleeping while results are due */
	/* out: added to by each run */
	int64_t sent, results, fast_retransmits, waits, spin_hits, spin_misses;
	double *rtts;         /* the round trips of the blocks taken that were sent once
			       * (Karn), for the caller's RTT estimator: rtts_cap at most */
	int64_t rtts_cap, n_rtts;
	double progress_at;   /* when a result last came */
	int64_t refused;      /* out: results whose tag was wrong (TAKE_REFUSED) */
};

enum { RUN_DONE = 0, RUN_OTHER = 1, RUN_IDLE = 2, RUN_INTR = 3 };

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Blocks in [low, top - gap] still without a result, not fast-resent yet: lost (results
 * come back in block order), resent once now rather than after the timeout. */
static int fast_resend(int fd, const struct aggbox_blocks *c, struct aggbox_progress *p,
		       int64_t top)
{
	int64_t lost[SEND_BATCH], n = 0;
	for (int64_t j = p->low; j <= top - p->fast_gap; j++) {
		if (c->done[j] || p->fast_resent[j])
			continue;
		p->fast_resent[j] = p->resent[j] = 1;
		lost[n++] = j;
		if (n == SEND_BATCH) {
			int r = aggbox_send_blocks(fd, c, lost, 0, n);
			if (r < 0)
				return r;
			p->fast_retransmits += n;
			n = 0;
		}
	}
	int r = n ? aggbox_send_blocks(fd, c, lost, 0, n) : 0;
	p->fast_retransmits += n;
	return r;
}

/* A fused call's result i into y while its values are in cache (see struct
 * aggbox_blocks). */
static void dequantize_taken(struct aggbox_blocks *c, int64_t i)
{
	int32_t e = c->out_exp[i];
	if (out_of_range(&e, 1, c->bits, -1)) {
		c->deq_failed = 1;
		return;
	}
	int64_t lo = i * c->block;
	dequantize_block(c->out, lo, block_end(lo, c->block, c->size), e, c->bits, c->n_mean,
			 (uint32_t)c->n_workers << c->bits, c->y);
	c->dequantized++;
}

/* Take every queued plain result; *progressed when one came. TAKE_EMPTY, TAKE_OTHER or
 * -errno. */
static int take_queued(int fd, struct aggbox_blocks *c, struct aggbox_progress *p,
		       int *progressed)
{
	for (;;) {
		int64_t i = 0;
		int r = take_one(fd, c, &i);
		if (r == TAKE_REFUSED) {
			p->refused++;
			continue;
		}
		if (r != TAKE_ONE)
			return r;
		*progressed = 1;
		p->results++;
		if (c->y)
			dequantize_taken(c, i);
		p->progress_at = now_s();
		if (!p->resent[i] && p->n_rtts < p->rtts_cap)
			p->rtts[p->n_rtts++] = p->progress_at - p->sent_at[i];
		while (p->low < c->n_blocks && c->done[p->low])
			p->low++;
		if (i >= p->low + p->fast_gap && (r = fast_resend(fd, c, p, i)) < 0)
			return r;
	}
}

/* Busy-poll for a queued datagram, at most spin_s: 1 when one is. */
static int spin(int fd, struct aggbox_progress *p)
{
	double until = now_s() + p->spin_s;
	struct aggbox_hdr h;
	do {
		if (recv(fd, &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT) >= 0) {
			p->spin_hits++;
			return 1;
		}
	} while (now_s() < until);
	p->spin_misses++;
	return 0;
}

/* The steady state of a call, without the caller: send what the window allows, take the
 * plain results into place (fast-resending gaps below them), sleep in poll while waiting;
 * until every block has its result (RUN_DONE), the next datagram is the caller's
 * (RUN_OTHER), no result comes for first_wait_s, or for wait_s after one that came
 * (RUN_IDLE: the caller resends), a signal comes (RUN_INTR: the caller runs its handler,
 * then calls again) or an error (-errno). */
int aggbox_run(int fd, struct aggbox_blocks *c, struct aggbox_progress *p,
	       double wait_s, double first_wait_s)
{
	double deadline = now_s() + first_wait_s;
	for (;;) {
		int64_t last = p->low + p->pool < c->n_blocks ? p->low + p->pool : c->n_blocks;
		if (p->next_send < last) {
			double t = now_s();
			for (int64_t i = p->next_send; i < last; i++)
				p->sent_at[i] = t;
			int r = aggbox_send_blocks(fd, c, NULL, p->next_send, last - p->next_send);
			if (r < 0)
				return r;
			p->sent += last - p->next_send;
			p->next_send = last;
		}
		int progressed = 0;
		int r = take_queued(fd, c, p, &progressed);
		if (r < 0)
			return r;
		if (p->low >= c->n_blocks)
			return RUN_DONE;
		if (r == TAKE_OTHER)
			return RUN_OTHER;
		if (progressed) {
			deadline = now_s() + wait_s;
			continue;
		}
		if (p->spin_s > 0 && p->next_send > p->low && spin(fd, p))
			continue;
		double left = deadline - now_s();
		if (left <= 0)
			return RUN_IDLE;
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		struct timespec ts = {.tv_sec = (time_t)left,
				      .tv_nsec = (long)((left - (time_t)left) * 1e9)};
		p->waits++;
		int ready = ppoll(&pfd, 1, &ts, NULL);
		if (ready < 0)
			return errno == EINTR ? RUN_INTR : -errno;
		if (ready == 0)
			return RUN_IDLE;
	}
}
