/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Records inherited by services that set none (see abi.h, inherit).
 *
 * A transparent proxy that knows nothing of records asks SO_ORIGINAL_DST on
 * the connection it accepted and then connects there. The record of the
 * accepted connection is kept under the asking thread and under its process,
 * in the asking socket's network namespace; that thread's (or else that
 * process's) next records-less connect to the same destination takes it.
 * Keyed this way, concurrent flows to one destination keep their own client
 * (a thread-per-connection proxy asks and connects on one thread), and only
 * the process holding the accepted socket can use its record: a client asking
 * SO_ORIGINAL_DST on its own redirected socket keeps nothing, so it cannot
 * dress a new socket in its service's hop.
 */
#ifndef CONNREDIR_INHERIT_H
#define CONNREDIR_INHERIT_H

#include "maps.h"
#include "record.h"
#include "trace.h"

static __always_inline void inherit_key(struct connredir_inherit_key *key, __u64 netns,
					__u32 tgid, __u32 tid,
					const struct connredir_endpoint *dst)
{
	key->netns = netns;
	key->tgid = tgid;
	key->tid = tid;
	key->dst = *dst;
}

/* `kept` is the hand-off of the flow whose record has `hops` hops, the
 * last redirected at `time_ns`: the same last redirect. */
static __always_inline int same_last_hop(const struct connredir_record *kept, __u32 hops,
					 __u64 time_ns)
{
	if (hops == 0 || hops != clamp_hops(kept->hop_count))
		return 0;
	return kept->hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)].time_ns == time_ns;
}

/* Both records are the same flow's hand-off: same last redirect. */
static __always_inline int same_flow(const struct connredir_record *a,
				     const struct connredir_record *b)
{
	__u32 hops = clamp_hops(b->hop_count);

	if (hops == 0)
		return 0;
	return same_last_hop(a, hops, b->hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)].time_ns);
}

/*
 * SO_ORIGINAL_DST on an accepted, redirected socket: keep its record for the
 * asker's onward connect to `dst`.
 */
static __always_inline void inherit_keep(__u64 netns, struct connredir_sock_state *state,
					 const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = (__u32)pid_tgid;

	if (!(state->flags & CONNREDIR_SOCK_ACCEPTED))
		return;
	inherit_key(&key, netns, tgid, tid, dst);
	bpf_map_update_elem(&inherit, &key, &state->record, BPF_ANY);
	key.tid = 0;
	bpf_map_update_elem(&inherit, &key, &state->record, BPF_ANY);
	state->flags |= CONNREDIR_SOCK_INHERIT_KEPT;
	state->inherit_tgid = tgid;
	state->inherit_tid = tid;
}

/*
 * inherit_keep() for an accepted socket holding its record in the one-hop
 * form (`small`, see abi.h): the entry is added blank and filled in place,
 * as a whole record does not fit on the stack. Only the asking thread uses
 * its own entry, so nobody reads it half filled; the process's entry is
 * then written whole, from it.
 */
static __always_inline void inherit_keep_hop(__u64 netns, struct connredir_sock_hop *small,
					     const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit *kept;
	const struct connredir_inherit *blank;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = (__u32)pid_tgid, zero = 0;

	if (!(small->flags & CONNREDIR_SOCK_ACCEPTED))
		return;
	blank = bpf_map_lookup_elem(&inherit_blank, &zero);
	if (!blank)
		return;
	inherit_key(&key, netns, tgid, tid, dst);
	if (bpf_map_update_elem(&inherit, &key, blank, BPF_ANY))
		return;
	kept = bpf_map_lookup_elem(&inherit, &key);
	if (!kept)
		return;
	record_from_hop(&kept->record, small);
	key.tid = 0;
	bpf_map_update_elem(&inherit, &key, kept, BPF_ANY);
	small->flags |= CONNREDIR_SOCK_INHERIT_KEPT;
	small->inherit_tgid = tgid;
	small->inherit_tid = tid;
}

/*
 * A records-less connect to `dst`: the record kept for this thread (or else
 * this process), copied into the socket's new state; NULL when none is kept
 * (or the state cannot be made).
 */
static __always_inline struct connredir_sock_state *
inherit_take(struct bpf_sock_addr *ctx, struct bpf_sock *sk, const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {}, other = {};
	struct connredir_sock_state *state;
	struct connredir_record *kept, *also;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 netns = bpf_get_netns_cookie(ctx);

	inherit_key(&key, netns, pid_tgid >> 32, (__u32)pid_tgid, dst);
	inherit_key(&other, netns, pid_tgid >> 32, 0, dst);
	kept = bpf_map_lookup_elem(&inherit, &key);
	if (!kept) {
		kept = bpf_map_lookup_elem(&inherit, &other);
		if (!kept)
			return NULL;
		key = other;
	} else {
		/* The process entry names the same flow unless another thread
		 * asked since: then it is that thread's to take. */
		also = bpf_map_lookup_elem(&inherit, &other);
		if (also && same_flow(also, kept))
			bpf_map_delete_elem(&inherit, &other);
	}
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (state) {
		state->record = *kept;
		state->flags = 0;
		count(CONNREDIR_CNT_RECORDS_INHERITED);
	}
	bpf_map_delete_elem(&inherit, &key);
	return state;
}

/* Removes the entries that the thread `tid` of `tgid` kept for the flow
 * whose last hop (of `hops`) is `last`, unless another flow's replaced them. */
static __always_inline void inherit_forget(__u64 netns, __u32 tgid, __u32 tid, __u32 hops,
					   const struct connredir_hop *last)
{
	struct connredir_inherit_key key = {};
	struct connredir_record *kept;
	__u64 time_ns = last->time_ns;

	inherit_key(&key, netns, tgid, tid, &last->original_dst);
	kept = bpf_map_lookup_elem(&inherit, &key);
	if (kept && same_last_hop(kept, hops, time_ns))
		bpf_map_delete_elem(&inherit, &key);
	key.tid = 0;
	kept = bpf_map_lookup_elem(&inherit, &key);
	if (kept && same_last_hop(kept, hops, time_ns))
		bpf_map_delete_elem(&inherit, &key);
}

/* The accepted socket (its `state`, in namespace `netns`) closes: what it
 * kept and nobody took goes. */
static __always_inline void inherit_on_close(struct connredir_sock_state *state, __u64 netns)
{
	__u32 hops;

	if (!(state->flags & CONNREDIR_SOCK_INHERIT_KEPT))
		return;
	hops = clamp_hops(state->record.hop_count);
	if (hops == 0)
		return;
	inherit_forget(netns, state->inherit_tgid, state->inherit_tid, hops,
		       &state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)]);
	state->flags &= ~CONNREDIR_SOCK_INHERIT_KEPT;
}

/* inherit_on_close() for a socket holding the one-hop form (`small`). */
static __always_inline void inherit_on_close_hop(struct connredir_sock_hop *small, __u64 netns)
{
	if (!(small->flags & CONNREDIR_SOCK_INHERIT_KEPT))
		return;
	inherit_forget(netns, small->inherit_tgid, small->inherit_tid, 1, &small->hop);
	small->flags &= ~CONNREDIR_SOCK_INHERIT_KEPT;
}

#endif /* CONNREDIR_INHERIT_H */
