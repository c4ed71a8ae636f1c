/* SPDX-License-Identifier: Apache-2.0
 *
 * siphash.h: SipHash-2-4 of one 32-byte AggBox header under a job's 128-bit key: the
 * keyed tag of an authenticated job (AGGBOX_F_AUTH). The tag travels as the 8 bytes
 * after the payload (little-endian); aggbox/auth.py computes the same function in user
 * space and tests/unit/test_auth.py checks both against the reference vector.
 *
 * The header is four little-endian 64-bit words, so the message needs no padding:
 * four compression steps of two rounds each, one for the length word (32 << 56), and
 * four finalisation rounds. Straight-line code (no loop for the verifier to walk); about
 * 30 ns per packet on this project's machine (docs/kernel.md).
 */
#ifndef AGGBOX_SIPHASH_H
#define AGGBOX_SIPHASH_H

#include "aggbox.h"
#include "lib/parse.h"

struct sip_key {
	__u64 k0;
	__u64 k1;
};

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

#define SIP_ROUND                                                                        \
	do {                                                                             \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32);        \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                               \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                               \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32);        \
	} while (0)

#define SIP_WORD(m)                                                                      \
	do {                                                                             \
		v3 ^= (m);                                                               \
		SIP_ROUND;                                                               \
		SIP_ROUND;                                                               \
		v0 ^= (m);                                                               \
	} while (0)

/* SipHash-2-4(key, the 32 bytes at w). */
static __always_inline __u64 siphash_hdr(const struct sip_key *key, const __u64 w[4])
{
	__u64 v0 = key->k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = key->k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = key->k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = key->k1 ^ 0x7465646279746573ULL;
	SIP_WORD(w[0]);
	SIP_WORD(w[1]);
	SIP_WORD(w[2]);
	SIP_WORD(w[3]);
	SIP_WORD(32ULL << 56);
	v2 ^= 0xff;
	SIP_ROUND;
	SIP_ROUND;
	SIP_ROUND;
	SIP_ROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/* The tag the header at `hdr` (in the packet, its 32 bytes checked) must carry. */
static __always_inline __u64 header_tag(const struct sip_key *key, const struct aggbox_hdr *hdr)
{
	__u64 w[4];
	__builtin_memcpy(w, hdr, sizeof(w));
	return siphash_hdr(key, w);
}

/* The tag for the header as it now stands in the skb (after a program rewrote it). */
static __always_inline int skb_header_tag(struct __sk_buff *skb, const struct sip_key *key,
					  __u64 *tag)
{
	__u64 w[4];
	if (bpf_skb_load_bytes(skb, HDR_OFF, w, sizeof(w)) != 0)
		return -1;
	*tag = siphash_hdr(key, w);
	return 0;
}

/* Does the packet carry the header's tag at byte `tag_off` of the frame? */
static __always_inline int tag_matches(struct __sk_buff *skb, const struct sip_key *key,
				       const struct aggbox_hdr *hdr, __u32 tag_off)
{
	__u64 tag = 0;
	if (bpf_skb_load_bytes(skb, tag_off, &tag, sizeof(tag)) != 0)
		return 0;
	return tag == header_tag(key, hdr);
}

#define AUTH_TAG_LEN 8

/* The bytes an (un)authenticated job's packets carry after their payload. */
static __always_inline __u32 auth_tag_len(__u32 auth)
{
	return auth ? AUTH_TAG_LEN : 0;
}

/* An authenticated job (`auth`) takes only packets flagged AGGBOX_F_AUTH, a job without
 * a key only unflagged ones (a tag there would be payload it does not expect): checked
 * first, so that a packet without the tag it must carry is counted as such. */
static __always_inline int auth_flag_matches(__u32 auth, const struct aggbox_hdr *hdr)
{
	return !auth == !(hdr->flags & AGGBOX_F_AUTH);
}

/* Then, once the length holds the tag: an authenticated job's packet carries its
 * header's tag at byte `tag_off`. */
static __always_inline int authentic(struct __sk_buff *skb, __u32 auth, const struct sip_key *key,
				     const struct aggbox_hdr *hdr, __u32 tag_off)
{
	return !auth || tag_matches(skb, key, hdr, tag_off);
}

/* Write the tag of the skb's header at byte `tag_off`. Returns 0, or -1. */
static __always_inline int write_tag(struct __sk_buff *skb, const struct sip_key *key,
				     __u32 tag_off)
{
	__u64 tag = 0;
	if (skb_header_tag(skb, key, &tag) != 0)
		return -1;
	return bpf_skb_store_bytes(skb, tag_off, &tag, sizeof(tag), 0);
}

#endif /* AGGBOX_SIPHASH_H */
