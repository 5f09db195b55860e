/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The record seal: SipHash-2-4 (64-bit output) of a record's bytes before
 * its seal field, under a 128-bit key that only the layer holds (the
 * seal_key map; BPF maps are root-only). SipHash is a keyed MAC made for
 * short inputs: without the key, no one can make a seal that checks, nor
 * change a sealed record so that it still checks.
 */
#ifndef CONNREDIR_SEAL_H
#define CONNREDIR_SEAL_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct connredir_seal_key);
} seal_key SEC(".maps");

/* The words the seal covers; CONNREDIR_RECORD_V2_SIZE is a multiple of 8. */
#define SEAL_WORDS (CONNREDIR_RECORD_V2_SIZE / 8)
_Static_assert(CONNREDIR_RECORD_V2_SIZE % 8 == 0, "the seal covers whole words");
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

/*
 * SipHash-2-4 of the SEAL_WORDS words at `words` (little-endian words, as
 * the reference reads them on this little-endian target; the input length
 * is a multiple of 8, so the last block holds only the length).
 */
static __always_inline __u64 seal_of(const struct connredir_seal_key *key, const __u64 *words)
{
	__u64 v0 = key->k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = key->k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = key->k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = key->k1 ^ 0x7465646279746573ULL;
	__u64 last = (__u64)CONNREDIR_RECORD_V2_SIZE << 56;

	for (__u32 i = 0; i < SEAL_WORDS; i++) {
		__u64 m = words[i];

		v3 ^= m;
		SIP_ROUND(v0, v1, v2, v3);
		SIP_ROUND(v0, v1, v2, v3);
		v0 ^= m;
	}
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

#endif /* CONNREDIR_SEAL_H */
