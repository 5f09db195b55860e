/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Records inherited by services that set none (see abi.h, inherit): the
 * asking side, and what a close removes. The taking side, a connect, is in
 * inherit_take.h.
 *
 * A transparent proxy that knows nothing of records asks SO_ORIGINAL_DST on
 * the connection it accepted and then connects there. The record of the
 * accepted connection joins the asking process's queue for that destination,
 * in the asking socket's network namespace, marked with the asking thread;
 * that process's next records-less connect to the destination takes one.
 * A queue, not one slot: an event-loop proxy asks for flow B before it
 * connects onward for flow A, and each of its onward connections must still
 * carry a record (one without would be decided as a new connection and sent
 * back through the services the flow already passed). Only the process
 * holding the accepted socket can use its record: a client asking
 * SO_ORIGINAL_DST on its own redirected socket keeps nothing, so it cannot
 * dress a new socket in its service's hop.
 */
#ifndef CONNREDIR_INHERIT_H
#define CONNREDIR_INHERIT_H

#include "maps.h"
#include "record.h"
#include "service.h"
#include "trace.h"

static __always_inline void inherit_key(struct connredir_inherit_key *key, __u64 netns,
					__u32 tgid, __u32 seq,
					const struct connredir_endpoint *dst)
{
	key->netns = netns;
	key->tgid = tgid;
	key->seq = seq;
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

/* The entry that an accepted socket kept at (`tgid`, `seq`) for `dst`, if
 * it is still its flow's (last of `hops` redirected at `time_ns`), taken or
 * not; NULL when another flow's has its place or it is gone. `key` is left
 * naming it. */
static __always_inline struct connredir_inherit *
inherit_entry_of(struct connredir_inherit_key *key, __u64 netns, __u32 tgid, __u32 seq,
		 const struct connredir_endpoint *dst, __u32 hops, __u64 time_ns)
{
	struct connredir_inherit *kept;

	inherit_key(key, netns, tgid, seq, dst);
	kept = bpf_map_lookup_elem(&inherit, key);
	if (!kept || !same_last_hop(&kept->record, hops, time_ns))
		return NULL;
	return kept;
}

/*
 * A new, blank entry at the tail of the asking process's queue for `dst`;
 * its place goes to `*seq`. The caller fills the record in place (a whole
 * record does not fit on the stack) and then publishes the entry with
 * inherit_publish(): until then its tid is 0, and no connect takes it.
 */
static __always_inline struct connredir_inherit *
inherit_push(__u64 netns, __u32 tgid, const struct connredir_endpoint *dst, __u32 *seq)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit_queue fresh = {}, *queue;
	const struct connredir_inherit *blank;
	__u32 zero = 0, place;

	inherit_key(&key, netns, tgid, 0, dst);
	queue = bpf_map_lookup_elem(&inherit_queue, &key);
	if (!queue) {
		/* Places start at a clock reading, not 0: a queue evicted and
		 * made again does not land on places of records still kept. */
		fresh.head = fresh.tail = (__u32)bpf_ktime_get_ns();
		bpf_map_update_elem(&inherit_queue, &key, &fresh, BPF_NOEXIST);
		queue = bpf_map_lookup_elem(&inherit_queue, &key);
		if (!queue)
			return NULL;
	}
	place = __sync_fetch_and_add(&queue->tail, 1);
	if ((__s32)(place - queue->head) >= CONNREDIR_INHERIT_QUEUE_DEPTH)
		queue->head = place - CONNREDIR_INHERIT_QUEUE_DEPTH + 1;
	blank = bpf_map_lookup_elem(&inherit_blank, &zero);
	if (!blank)
		return NULL;
	key.seq = place;
	if (bpf_map_update_elem(&inherit, &key, blank, BPF_ANY))
		return NULL;
	*seq = place;
	return bpf_map_lookup_elem(&inherit, &key);
}

/*
 * The asking process's start, in a kept entry: the low 32 bits of its start
 * time in clock ticks, held in the kept copy's `reserved` (never read from a
 * kept record otherwise, and cleared when the record is taken; see
 * connredir_inherit in maps.h). A queue is keyed by the asker's pid, and a
 * process given that pid once the asker exited must not take its records.
 */
#define INHERIT_ASKER_START(entry) ((entry)->record.reserved)

/* The filled entry becomes takeable: the asker's start is noted, and its
 * tid is written last, with a full barrier, so no connect reads a record
 * half written. */
static __always_inline void inherit_publish(struct connredir_inherit *entry, __u32 tid)
{
	INHERIT_ASKER_START(entry) = (__u32)current_start_ticks();
	__sync_lock_test_and_set(&entry->tid, tid ? tid : 1);
}

/*
 * SO_ORIGINAL_DST on an accepted, redirected socket: queue its record for the
 * asker's onward connect to `dst`, unless it is queued already.
 */
static __always_inline void inherit_keep(__u64 netns, struct connredir_sock_state *state,
					 const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit *entry;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, hops, seq = 0;

	if (!(state->flags & CONNREDIR_SOCK_ACCEPTED))
		return;
	hops = clamp_hops(state->record.hop_count);
	if ((state->flags & CONNREDIR_SOCK_INHERIT_KEPT) && hops &&
	    inherit_entry_of(&key, netns, state->inherit_tgid, state->inherit_seq, dst, hops,
			     state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)].time_ns))
		return;
	entry = inherit_push(netns, tgid, dst, &seq);
	if (!entry)
		return;
	entry->record = state->record;
	inherit_publish(entry, (__u32)pid_tgid);
	state->flags |= CONNREDIR_SOCK_INHERIT_KEPT;
	state->inherit_tgid = tgid;
	state->inherit_seq = seq;
}

/* inherit_keep() for an accepted socket holding its record in the one-hop
 * form (`small`, see abi.h). */
static __always_inline void inherit_keep_hop(__u64 netns, struct connredir_sock_hop *small,
					     const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit *entry;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, seq = 0;

	if (!(small->flags & CONNREDIR_SOCK_ACCEPTED))
		return;
	if ((small->flags & CONNREDIR_SOCK_INHERIT_KEPT) &&
	    inherit_entry_of(&key, netns, small->inherit_tgid, small->inherit_seq, dst, 1,
			     small->hop.time_ns))
		return;
	entry = inherit_push(netns, tgid, dst, &seq);
	if (!entry)
		return;
	record_from_hop(&entry->record, small);
	inherit_publish(entry, (__u32)pid_tgid);
	small->flags |= CONNREDIR_SOCK_INHERIT_KEPT;
	small->inherit_tgid = tgid;
	small->inherit_seq = seq;
}

/*
 * The accepted connection that kept the entry at (`tgid`, `seq`) for the
 * flow whose last hop (of `hops`) is `last` closes. A taken entry goes (and
 * the queue's head moves past it when it was the oldest). One not taken
 * stays, orphaned: the onward connect for this flow may have taken an
 * earlier flow's entry (the oldest), and that flow's connect, still to come,
 * needs this one; the head passes it once it is out of reach (inherit_take.h).
 */
static __always_inline void inherit_forget(__u64 netns, __u32 tgid, __u32 seq, __u32 hops,
					   const struct connredir_hop *last)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit_queue *queue;
	struct connredir_inherit *kept;

	kept = inherit_entry_of(&key, netns, tgid, seq, &last->original_dst, hops, last->time_ns);
	if (!kept)
		return;
	if (__sync_val_compare_and_swap(&kept->taken, CONNREDIR_INHERIT_WAITING,
					CONNREDIR_INHERIT_ORPHANED) == CONNREDIR_INHERIT_WAITING)
		return;
	bpf_map_delete_elem(&inherit, &key);
	key.seq = 0;
	queue = bpf_map_lookup_elem(&inherit_queue, &key);
	if (queue && queue->head == seq)
		queue->head = seq + 1;
}

/*
 * The connect of an onward socket that took its record from the queue
 * (CONNREDIR_SOCK_INHERITED in its `state`) failed: refused by the layer, or
 * by the far end, or timed out. The record goes back to its place, untaken
 * and within the head's reach, so the service's next attempt, which a proxy
 * makes on a new socket without asking again (haproxy's retries), takes it:
 * decided without it, that attempt would go back through the services the
 * flow already passed, and fail and retry there again, one level deeper each
 * time.
 */
static __always_inline void inherit_give_back(struct connredir_sock_state *state, __u64 netns)
{
	struct connredir_inherit_key key = {};
	struct connredir_inherit_queue *queue;
	struct connredir_inherit *entry;
	const struct connredir_hop *last;
	__u32 hops;

	if (!(state->flags & CONNREDIR_SOCK_INHERITED))
		return;
	state->flags &= ~CONNREDIR_SOCK_INHERITED;
	/* The inherited record's hops, without the one this socket's own
	 * connect may have added (a redirect to the next service). */
	hops = clamp_hops(state->record.hop_count);
	if ((state->flags & CONNREDIR_SOCK_OWN_HOP) && hops > 0)
		hops -= 1;
	if (hops == 0)
		return;
	last = &state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)];
	entry = inherit_entry_of(&key, netns, state->inherit_tgid, state->inherit_seq,
				 &last->original_dst, hops, last->time_ns);
	if (!entry)
		return;
	entry->taken = entry->taken == CONNREDIR_INHERIT_ORPHAN_TAKEN ? CONNREDIR_INHERIT_ORPHANED
								       : CONNREDIR_INHERIT_WAITING;
	key.seq = 0;
	queue = bpf_map_lookup_elem(&inherit_queue, &key);
	if (queue && (__s32)(state->inherit_seq - queue->head) < 0)
		queue->head = state->inherit_seq;
}

/* The accepted socket (its `state`, in namespace `netns`) closes: what it
 * kept goes if taken, or stays orphaned (inherit_forget). */
static __always_inline void inherit_on_close(struct connredir_sock_state *state, __u64 netns)
{
	__u32 hops;

	if (!(state->flags & CONNREDIR_SOCK_INHERIT_KEPT))
		return;
	hops = clamp_hops(state->record.hop_count);
	if (hops == 0)
		return;
	inherit_forget(netns, state->inherit_tgid, state->inherit_seq, hops,
		       &state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)]);
	state->flags &= ~CONNREDIR_SOCK_INHERIT_KEPT;
}

/* inherit_on_close() for a socket holding the one-hop form (`small`). */
static __always_inline void inherit_on_close_hop(struct connredir_sock_hop *small, __u64 netns)
{
	if (!(small->flags & CONNREDIR_SOCK_INHERIT_KEPT))
		return;
	inherit_forget(netns, small->inherit_tgid, small->inherit_seq, 1, &small->hop);
	small->flags &= ~CONNREDIR_SOCK_INHERIT_KEPT;
}

#endif /* CONNREDIR_INHERIT_H */
