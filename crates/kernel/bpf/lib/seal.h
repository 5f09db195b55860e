/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The record seal: SipHash-2-4 (64-bit output) of what the layer reads of
 * a record (below), under a 128-bit key that only the layer holds (the
 * seal_key map; BPF maps are root-only). SipHash is a keyed MAC made for
 * short inputs: without the key, no one can make a seal that checks, nor
 * change a sealed record so that it still checks.
 *
 * Records are sealed as they leave the layer (getsockopt SO_RECORDS, in
 * sockopt.c) and checked as they come back (is_callers_sealed_record, for
 * setsockopt SO_RECORDS).
 */
#ifndef CONNREDIR_SEAL_H
#define CONNREDIR_SEAL_H

#include "maps.h"
#include "record.h"
#include "service.h"

/*
 * What the seal covers: every byte of the record the layer reads, that is
 * the header, the hop_count hops in use and client_comm; not the unused hop
 * slots (the layer zeroes them when it takes a record), so a one-hop record
 * costs 14 words of SipHash, not 70.
 */
#define SEAL_HEAD_WORDS (__builtin_offsetof(struct connredir_record, hops) / 8)
#define SEAL_HOP_WORDS (sizeof(struct connredir_hop) / 8)
#define SEAL_MAX_WORDS (SEAL_HEAD_WORDS + CONNREDIR_MAX_HOPS * SEAL_HOP_WORDS)
_Static_assert(__builtin_offsetof(struct connredir_record, hops) % 8 == 0 &&
		       sizeof(struct connredir_hop) % 8 == 0,
	       "the seal covers whole words");
_Static_assert(__builtin_offsetof(struct connredir_record, client_comm) == SEAL_MAX_WORDS * 8 &&
		       sizeof(((struct connredir_record *)0)->client_comm) == 16,
	       "client_comm is the two words after the hops");
_Static_assert(__builtin_offsetof(struct connredir_record, seal) + 8 ==
		       sizeof(struct connredir_record),
	       "the seal is the record's last field");

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

#define SIP_ROUND(v0, v1, v2, v3)                                                          \
	do {                                                                               \
		v0 += v1;                                                                  \
		v1 = SIP_ROTL(v1, 13);                                                     \
		v1 ^= v0;                                                                  \
		v0 = SIP_ROTL(v0, 32);                                                     \
		v2 += v3;                                                                  \
		v3 = SIP_ROTL(v3, 16);                                                     \
		v3 ^= v2;                                                                  \
		v0 += v3;                                                                  \
		v3 = SIP_ROTL(v3, 21);                                                     \
		v3 ^= v0;                                                                  \
		v2 += v1;                                                                  \
		v1 = SIP_ROTL(v1, 17);                                                     \
		v1 ^= v2;                                                                  \
		v2 = SIP_ROTL(v2, 32);                                                     \
	} while (0)

/* The layer's key, or NULL while none is set (all zero): a known key would
 * let anyone seal. */
static __always_inline const struct connredir_seal_key *seal_key_get(void)
{
	__u32 zero = 0;
	const struct connredir_seal_key *key = bpf_map_lookup_elem(&seal_key, &zero);

	if (!key || (key->k0 == 0 && key->k1 == 0))
		return NULL;
	return key;
}

/* One 8-byte message word through SipHash's compression (c = 2). */
#define SIP_WORD(v0, v1, v2, v3, m)                                                       \
	do {                                                                               \
		__u64 m_ = (m);                                                            \
		v3 ^= m_;                                                                  \
		SIP_ROUND(v0, v1, v2, v3);                                                 \
		SIP_ROUND(v0, v1, v2, v3);                                                 \
		v0 ^= m_;                                                                  \
	} while (0)

/*
 * SipHash-2-4 of the covered bytes of `record` (see above): the header and
 * used hops, then client_comm, read as little-endian words as the reference
 * does on this little-endian target. Every part is a whole number of words,
 * so the last block holds only the length. `record` must hold a whole
 * record; its hop_count must be at most CONNREDIR_MAX_HOPS.
 */
static __always_inline __u64 seal_of(const struct connredir_seal_key *key,
				     const struct connredir_record *record)
{
	const __u64 *words = (const __u64 *)record;
	const __u64 *comm = (const __u64 *)record->client_comm;
	__u32 used = SEAL_HEAD_WORDS + clamp_hops(record->hop_count) * SEAL_HOP_WORDS;
	__u64 v0 = key->k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = key->k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = key->k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = key->k1 ^ 0x7465646279746573ULL;
	__u64 last;

	/* Fixed offsets for the verifier: a counted loop, left when done. */
	for (__u32 i = 0; i < SEAL_MAX_WORDS; i++) {
		if (i >= used)
			break;
		SIP_WORD(v0, v1, v2, v3, words[i]);
	}
	SIP_WORD(v0, v1, v2, v3, comm[0]);
	SIP_WORD(v0, v1, v2, v3, comm[1]);
	last = (__u64)((used + 2) * 8) << 56;
	v3 ^= last;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= last;
	v2 ^= 0xff;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

/*
 * May a process that is not root hand this well-formed record to a socket?
 * Only a record the layer issued (version 3, sealed under the layer's key)
 * whose last hop is one of the caller's services: the record of a flow the
 * caller's service accepted. Anything else could name other services (so
 * they are skipped), fill the chain (so the flow goes direct) or invent a
 * client. `in` holds a whole version 3 record when this is called.
 */
static __always_inline int is_callers_sealed_record(const struct connredir_record *in,
						    const struct caller_services *caller)
{
	const struct connredir_seal_key *key;
	__u32 hop_count = in->hop_count, last = 0;

	if (in->version != CONNREDIR_RECORD_VERSION || in->size != sizeof(*in))
		return 0;
	/* Fixed offsets only: the verifier loses the bounds of a blob pointer
	 * moved by a value read from the blob. */
	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++) {
		if (i + 1 == hop_count)
			last = in->hops[i].service_id;
	}
	/* 0 when hop_count is 0 or past the chain; never a service id. */
	if (!caller_is(caller, last))
		return 0;
	key = seal_key_get();
	return key && seal_of(key, in) == in->seal;
}

#endif /* CONNREDIR_SEAL_H */
