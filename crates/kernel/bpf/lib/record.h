/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The redirect record (struct connredir_record of abi.h) as the programs
 * read it: its hops, the chain of services that handled the flow, and the
 * hop a socket's own connect added.
 */
#ifndef CONNREDIR_RECORD_H
#define CONNREDIR_RECORD_H

#include "service.h"

static __always_inline __u32 clamp_hops(__u32 hop_count)
{
	return hop_count > CONNREDIR_MAX_HOPS ? CONNREDIR_MAX_HOPS : hop_count;
}

/*
 * The services in a flow's chain, gathered once per connect so the rule loop
 * needs no inner loop: a bit per service id (ids are below
 * CONNREDIR_MAX_SERVICES = 64) and the id of the newest hop.
 */
struct chain_summary {
	__u64 seen;
	__u64 opened_by; /* the services whose process opened the flow */
	__u32 last;
	__u32 hop_count;
};

static __always_inline void summarise_chain(const struct connredir_record *record,
					    __u32 hop_count, struct chain_summary *out)
{
	out->seen = 0;
	out->opened_by = hop_count ? opener_services(record) : 0;
	out->last = 0;
	out->hop_count = hop_count;
	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++) {
		__u32 id;

		if (i >= hop_count)
			break;
		id = record->hops[i].service_id;
		out->seen |= service_bit(id);
		out->last = id;
	}
}

/* The flow's redirect state for `service_id` (see abi.h). */
static __always_inline __u8 chain_state(const struct chain_summary *chain, __u32 service_id)
{
	if (!chain->hop_count)
		return CONNREDIR_STATE_NOT_REDIRECTED;
	if (chain->last == service_id)
		return CONNREDIR_STATE_BY_SELF;
	if (chain->seen & service_bit(service_id))
		return CONNREDIR_STATE_PREVIOUSLY_BY_SELF;
	return CONNREDIR_STATE_BY_OTHER;
}

/*
 * Takes back the hop this socket's own earlier connect() appended: that
 * attempt was refused, failed or was disconnected, and this one is decided
 * afresh (state written at connect time is provisional, see abi.h).
 */
static __always_inline void undo_own_hop(struct connredir_sock_state *state)
{
	if (!(state->flags & CONNREDIR_SOCK_OWN_HOP))
		return;
	if (state->record.hop_count > 0)
		state->record.hop_count -= 1;
	state->flags &= ~(CONNREDIR_SOCK_OWN_HOP | CONNREDIR_SOCK_HANDOFF_PENDING);
}

/* The newest hop of the record that belongs to one of the caller's services. */
static __always_inline const struct connredir_hop *
own_hop(const struct connredir_record *record, const struct caller_services *caller)
{
	__u32 hop_count = clamp_hops(record->hop_count);
	const struct connredir_hop *found = NULL;

	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++) {
		if (i >= hop_count)
			break;
		if (caller_is(caller, record->hops[i].service_id))
			found = &record->hops[i];
	}
	return found;
}

/*
 * Whether `record` is wholly known from its one hop and its client (see
 * struct connredir_sock_hop in abi.h): one hop, this version's header, no
 * flags, zero reserved fields. Unused hop slots are empty in every record
 * the layer keeps (set zeroes them, a connect writes only the slot it
 * appends), and the stored seal is always 0 (made when handed out).
 */
static __always_inline int record_is_one_hop(const struct connredir_record *record)
{
	return record->hop_count == 1 && record->magic == CONNREDIR_RECORD_MAGIC &&
	       record->version == CONNREDIR_RECORD_VERSION &&
	       record->size == sizeof(struct connredir_record) && record->flags == 0 &&
	       record->reserved == 0 && record->hops[0].reserved == 0;
}

/* The one-hop form of `record` (record_is_one_hop()) into `out`, whose
 * inheritance fields are left as they are. */
static __always_inline void hop_from_record(struct connredir_sock_hop *out,
					    const struct connredir_record *record)
{
	out->client_pid = record->client_pid;
	out->client_uid = record->client_uid;
	out->client_cgroup_id = record->client_cgroup_id;
	__builtin_memcpy(out->client_comm, record->client_comm, sizeof(out->client_comm));
	out->hop = record->hops[0];
}

/* The whole record that the one-hop form `in` stands for, into `out`,
 * which must be all zero before (a blank map entry, or cleared). */
static __always_inline void record_from_hop(struct connredir_record *out,
					    const struct connredir_sock_hop *in)
{
	out->magic = CONNREDIR_RECORD_MAGIC;
	out->version = CONNREDIR_RECORD_VERSION;
	out->size = sizeof(struct connredir_record);
	out->hop_count = 1;
	out->client_pid = in->client_pid;
	out->client_uid = in->client_uid;
	out->client_cgroup_id = in->client_cgroup_id;
	out->hops[0] = in->hop;
	__builtin_memcpy(out->client_comm, in->client_comm, sizeof(out->client_comm));
}

/*
 * Where the socket's record is: its state when that holds one (returned),
 * else the record's one-hop form (`*small`, lib/handoff.h); both NULL when
 * the socket has no record. A socket holding the one-hop form may also
 * have a state without a record (the acceleration's byte count at close).
 */
static __always_inline struct connredir_sock_state *record_holder(struct bpf_sock *sk,
								  struct connredir_sock_hop **small)
{
	struct connredir_sock_state *state = bpf_sk_storage_get(&sock_state, sk, 0, 0);

	*small = NULL;
	if (state && state->record.hop_count > 0)
		return state;
	*small = bpf_sk_storage_get(&sock_hop, sk, 0, 0);
	return NULL;
}

#endif /* CONNREDIR_RECORD_H */
