/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Hand-off of the redirect record from the connecting socket to the socket
 * the service accepts.
 *
 * TCP_CONNECT_CB (client side, source address now bound): the record goes into
 * the hand-off map under the connection's 4-tuple. PASSIVE_ESTABLISHED_CB
 * (service side, in the listener's cgroup): the record is copied onto the
 * accepted socket and the entry deleted. The key is the 4-tuple and the
 * network namespace: a socket of another namespace with the same addresses
 * never reads, replaces or deletes this connection's entry. A connection that never reaches the
 * service (refused, reset, timed out) deletes its entry when the client socket
 * closes, so the map does not grow without bound.
 *
 * The redirected client socket is also listed in the conns map (conns.h),
 * from TCP_CONNECT_CB until it closes: the live redirected connections.
 */
#ifndef CONNREDIR_HANDOFF_H
#define CONNREDIR_HANDOFF_H

#include "maps.h"
#include "addr.h"
#include "trace.h"
#include "service.h"
#include "record.h"
#include "conns.h"

/* The count of entries held by other namespaces when `netns` is one of
 * them; NULL for the layer's own namespace (or before the engine said
 * which that is). */
static __always_inline __u64 *foreign_held(__u64 netns)
{
	__u32 home_at = CONNREDIR_BUDGET_HOME_NETNS, held_at = CONNREDIR_BUDGET_FOREIGN_HELD;
	__u64 *home = bpf_map_lookup_elem(&handoff_budget, &home_at);

	if (!home || *home == 0 || *home == netns)
		return NULL;
	return bpf_map_lookup_elem(&handoff_budget, &held_at);
}

/* Deletes a hand-off entry, and gives its place back to its namespace. */
static __always_inline void handoff_delete(const struct connredir_handoff_key *key)
{
	__u64 *held;

	if (bpf_map_delete_elem(&handoff, key))
		return;
	held = foreign_held(key->netns);
	if (held)
		__sync_fetch_and_add(held, -1);
}

static __always_inline void handoff_key(struct connredir_handoff_key *key, __u64 netns,
					const __u32 client[4], __u16 client_port,
					const __u32 service[4], __u16 service_port)
{
	key->netns = netns;
	__builtin_memcpy(key->client_addr, client, 16);
	__builtin_memcpy(key->service_addr, service, 16);
	key->client_port = client_port;
	key->service_port = service_port;
}

/*
 * After the hand-off: a socket whose record is its own one hop and nothing
 * else (the flow's first redirect, no acceleration) keeps the one-hop form
 * (sock_hop, see abi.h) instead of its whole state, which goes. `state`
 * must not be used after this.
 */
static __always_inline void compact_after_handoff(struct bpf_sock *sk,
						  const struct connredir_sock_state *state)
{
	struct connredir_sock_hop *small;

	if (state->flags != CONNREDIR_SOCK_OWN_HOP || !record_is_one_hop(&state->record))
		return;
	small = bpf_sk_storage_get(&sock_hop, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!small)
		return; /* the whole state stays: it answers the same */
	hop_from_record(small, &state->record);
	small->flags = CONNREDIR_SOCK_OWN_HOP;
	bpf_sk_storage_delete(&sock_state, sk);
}

/* TCP_CONNECT_CB of a socket whose connect was redirected (its `state`
 * has CONNREDIR_SOCK_HANDOFF_PENDING). `state` must not be used after
 * this (it may have been replaced by the one-hop form). */
static __always_inline void handoff_on_connect(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					       struct connredir_sock_state *state, __u64 netns,
					       const struct tuple *tp, __u32 cb_flags)
{
	struct connredir_handoff_key key = {};
	struct connredir_hop *hop;
	struct tuple t = *tp;
	__u32 hop_count;
	int handed, tracked;
	__u64 *held;

	state->flags &= ~CONNREDIR_SOCK_HANDOFF_PENDING;
	hop_count = clamp_hops(state->record.hop_count);
	if (hop_count == 0)
		return;

	hop = &state->record.hops[(hop_count - 1) & (CONNREDIR_MAX_HOPS - 1)];
	/*
	 * Only to the service the hop names. A redirected connect can fail
	 * before it opens a connection (an IPv4-mapped destination on an
	 * IPV6_V6ONLY socket); its hop stays until the socket's next decided
	 * connect takes it back, and a connect to an address no rule covers
	 * is not decided. Handed to whatever that connect reached (another
	 * service), the record would tell it that this hop's service had
	 * handled the flow, and it would send the flow on past that service.
	 */
	if (service_at(t.remote, t.remote_port) != hop->service_id)
		return;
	endpoint_set_v6(&hop->local, t.local, bpf_htons(t.local_port));

	handoff_key(&key, netns, t.local, t.local_port, t.remote, t.remote_port);
	held = foreign_held(netns);
	if (held && (__s64)*held >= CONNREDIR_MAX_FOREIGN_HANDOFFS) {
		/* Other namespaces hold their share: the host's flows keep theirs. */
		handed = 0;
	} else {
		handed = bpf_map_update_elem(&handoff, &key, &state->record,
					     held ? BPF_NOEXIST : BPF_ANY) == 0;
		if (handed && held)
			__sync_fetch_and_add(held, 1);
	}
	if (!handed)
		count(CONNREDIR_CNT_HANDOFF_MISSES);
	tracked = conns_track(bpf_get_socket_cookie(skops), state, hop_count,
			      CONNREDIR_PROTO_TCP);
	/* Ask for state changes: closing removes the entries made here. */
	if (handed || tracked)
		bpf_sock_ops_cb_flags_set(skops, cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	compact_after_handoff(sk, state);
}

/*
 * Whether the service at `addr`:`port` accelerates its flows. Its accepted
 * sockets keep the whole state: a socket it cuts through gets one at close
 * anyway (the byte count, accel.h), and both forms together would cost
 * more than the whole state alone.
 */
static __always_inline int accelerated_at(const __u32 addr[4], __u16 port)
{
	struct connredir_service *service;
	__u32 id = service_at(addr, port);

	service = bpf_map_lookup_elem(&services, &id);
	return service && (service->flags & CONNREDIR_SERVICE_ACCELERATE);
}

/* Returns 1 when the accepted socket got its flow's record. */
static __always_inline int handoff_on_passive_established(struct bpf_sock *sk, __u64 netns,
							  const struct tuple *tp)
{
	struct connredir_handoff_key key = {};
	struct connredir_sock_state *state;
	struct connredir_sock_hop *small;
	struct connredir_record *record;
	const struct tuple t = *tp;
	int got;

	handoff_key(&key, netns, t.remote, t.remote_port, t.local, t.local_port);
	record = bpf_map_lookup_elem(&handoff, &key);
	if (!record) {
		/* Only a service's listener is owed a record. */
		if (service_at(t.local, t.local_port))
			count(CONNREDIR_CNT_HANDOFF_MISSES);
		return 0;
	}
	if (record_is_one_hop(record) && !accelerated_at(t.local, t.local_port)) {
		/* The usual flow, redirected once: its one-hop form (abi.h). */
		small = bpf_sk_storage_get(&sock_hop, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (small) {
			hop_from_record(small, record);
			small->flags = CONNREDIR_SOCK_ACCEPTED;
		}
		got = small != NULL;
	} else {
		state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (state) {
			state->record = *record;
			state->flags = CONNREDIR_SOCK_ACCEPTED;
		}
		got = state != NULL;
	}
	count(got ? CONNREDIR_CNT_HANDOFFS : CONNREDIR_CNT_HANDOFF_MISSES);
	handoff_delete(&key);
	return got;
}

static __always_inline void handoff_on_close(struct bpf_sock_ops *skops, __u64 netns,
					     const struct tuple *tp)
{
	struct connredir_handoff_key key = {};
	const struct tuple t = *tp;
	__u64 cookie = bpf_get_socket_cookie(skops);

	handoff_key(&key, netns, t.local, t.local_port, t.remote, t.remote_port);
	handoff_delete(&key);
	conns_forget(cookie);
}

#endif /* CONNREDIR_HANDOFF_H */
