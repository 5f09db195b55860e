/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Records inherited by services that set none: the taking side, a
 * records-less connect by a service's process (the asking side is
 * inherit.h).
 *
 * inherit_claim() is a global function, verified once on its own: its scan
 * of the queue, inline in the connect program, would multiply that
 * program's paths. Include this header from one entry file only
 * (connect.c, through decide.h).
 */
#ifndef CONNREDIR_INHERIT_TAKE_H
#define CONNREDIR_INHERIT_TAKE_H

#include "inherit.h"

/* How many of a queue's newest places may have been taken by an
 * inherit_push() that has not written its entry yet: one per CPU asking at
 * once, for one process and destination. */
#define INHERIT_PLACES_IN_FLIGHT 16

/*
 * How far the head of a queue can move: past the leading places that hold
 * nothing takeable (taken, removed, or orphaned and out of reach: older
 * than the newest CONNREDIR_INHERIT_SCAN places), at most
 * CONNREDIR_INHERIT_SCAN of them. A missing entry among the newest
 * INHERIT_PLACES_IN_FLIGHT places may be one not written yet, so the head
 * stops there. Returns how many places to pass.
 */
static __always_inline __u32 inherit_passable(struct connredir_inherit_key *key, __u32 head,
					      __u32 tail)
{
	struct connredir_inherit *entry;
	__u32 i;

	for (i = 0; i < CONNREDIR_INHERIT_SCAN; i++) {
		__u32 seq = head + i;

		if ((__s32)(tail - seq) <= INHERIT_PLACES_IN_FLIGHT)
			break;
		key->seq = seq;
		entry = bpf_map_lookup_elem(&inherit, key);
		if (!entry)
			continue;
		if (entry->taken == CONNREDIR_INHERIT_WAITING ||
		    (entry->taken == CONNREDIR_INHERIT_ORPHANED &&
		     (__s32)(tail - seq) <= CONNREDIR_INHERIT_SCAN))
			break;
	}
	return i;
}

/*
 * Claims the oldest record from place `from` on (at most
 * CONNREDIR_INHERIT_SCAN places, before `tail`) that is written, not taken
 * (orphaned or not), asked for by the process that started at `start`
 * (INHERIT_ASKER_START) and (if `tid` is not 0) by its thread `tid`; marks
 * it taken, so no other connect takes it. Returns its place, or -1.
 */
static __always_inline __s64 inherit_claim_from(struct connredir_inherit_key *key, __u32 from,
						__u32 tail, __u32 tid, __u32 start)
{
	struct connredir_inherit *entry;

	for (__u32 i = 0; i < CONNREDIR_INHERIT_SCAN; i++) {
		__u32 seq = from + i;

		if ((__s32)(tail - seq) <= 0)
			break;
		key->seq = seq;
		entry = bpf_map_lookup_elem(&inherit, key);
		/* tid 0: still being filled (inherit_publish). */
		if (!entry || !entry->tid || (tid && entry->tid != tid) ||
		    INHERIT_ASKER_START(entry) != start)
			continue;
		if (__sync_val_compare_and_swap(&entry->taken, CONNREDIR_INHERIT_WAITING,
						CONNREDIR_INHERIT_TAKEN) == CONNREDIR_INHERIT_WAITING)
			return seq;
		if (__sync_val_compare_and_swap(&entry->taken, CONNREDIR_INHERIT_ORPHANED,
						CONNREDIR_INHERIT_ORPHAN_TAKEN) ==
		    CONNREDIR_INHERIT_ORPHANED)
			return seq;
	}
	return -1;
}

/*
 * Claims a record queued by process `tgid` (which started at `start`) for
 * `dst` in namespace `netns` for a connect by its thread `tid`: among the
 * first CONNREDIR_INHERIT_SCAN places from the queue's head, the oldest
 * that thread asked for, or else the oldest of any thread's. Marks it taken
 * and returns its place; -1 when none is waiting. Moves the head past
 * leading places that hold nothing takeable. Each scan is its own loop that
 * carries nothing but its index, so the verifier walks the places once
 * each.
 */
__noinline __s64 inherit_claim(__u64 netns, __u32 tgid, __u32 tid, __u32 start,
			       const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit_queue *queue;
	__u32 head, tail;
	__s64 seq;

	if (!dst)
		return -1;
	inherit_key(&key, netns, tgid, 0, dst);
	queue = bpf_map_lookup_elem(&inherit_queue, &key);
	if (!queue)
		return -1;
	head = queue->head;
	tail = queue->tail;
	head += inherit_passable(&key, head, tail);
	if (head != queue->head)
		queue->head = head;
	seq = inherit_claim_from(&key, head, tail, tid ? tid : 1, start);
	if (seq < 0)
		seq = inherit_claim_from(&key, head, tail, 0, start);
	return seq;
}

/*
 * A records-less connect to `dst` (the socket of `ctx`): the record claimed
 * for this thread (or else this process) is copied into the socket's new
 * state. Returns 1 when the socket has that state, 0 when none is queued
 * (or the state cannot be made).
 */
static __always_inline int inherit_take(struct bpf_sock_addr *ctx,
					const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_sock_state *state;
	struct connredir_inherit *kept;
	struct bpf_sock *sk;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 netns;
	__s64 seq;

	sk = ctx->sk;
	if (!sk)
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	seq = inherit_claim(netns, pid_tgid >> 32, (__u32)pid_tgid, (__u32)current_start_ticks(),
			    dst);
	if (seq < 0)
		return 0;
	inherit_key(&key, netns, pid_tgid >> 32, (__u32)seq, dst);
	kept = bpf_map_lookup_elem(&inherit, &key);
	if (!kept)
		return 0;
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 0;
	state->record = kept->record;
	state->record.reserved = 0;
	state->flags = CONNREDIR_SOCK_INHERITED;
	state->inherit_tgid = pid_tgid >> 32;
	state->inherit_seq = (__u32)seq;
	count(CONNREDIR_CNT_RECORDS_INHERITED);
	return 1;
}

/*
 * The layer refuses the connect of `ctx`'s socket: a record it took from
 * the queue goes back (inherit_give_back). A global function, so the
 * connect program pays only a call for it.
 */
__noinline int inherit_return(struct bpf_sock_addr *ctx)
{
	struct connredir_sock_state *state;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 0;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return 0;
	inherit_give_back(state, bpf_get_netns_cookie(ctx));
	return 0;
}

#endif /* CONNREDIR_INHERIT_TAKE_H */
