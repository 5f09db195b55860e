/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The live-connection list: the conns map, one entry per redirected socket
 * (a leg of a flow), keyed by its socket cookie. TCP legs are listed by
 * sockops (handoff.h) and leave when the socket closes; UDP legs are listed
 * where their redirect is decided (udp.h, from connect.c) and leave when
 * the socket is released (release.c) or decided past every service.
 */
#ifndef CONNREDIR_CONNS_H
#define CONNREDIR_CONNS_H

#include "maps.h"
#include "trace.h"

/* Writes the leg of the socket whose state is `state` into `conn`; the hop
 * count last, so that a reader skips an entry still blank (count 0). */
static __always_inline void conns_fill(struct connredir_conn *conn,
				       const struct connredir_sock_state *state, __u32 hop_count,
				       __u8 protocol)
{
	const struct connredir_hop *last = &state->record.hops[(hop_count - 1) &
							       (CONNREDIR_MAX_HOPS - 1)];

	conn->time_ns = last->time_ns;
	conn->cgroup_id = state->cgroup_id;
	conn->pid = state->pid;
	conn->uid = state->uid;
	__builtin_memcpy(conn->comm, state->comm, sizeof(conn->comm));
	conn->client_pid = state->record.client_pid;
	conn->client_uid = state->record.client_uid;
	conn->protocol = protocol;
	conn->reserved = 0;
	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++)
		conn->chain[i] = i < hop_count ? state->record.hops[i].service_id : 0;
	conn->client = state->record.hops[0].local;
	conn->local = last->local;
	conn->original_dst = last->original_dst;
	conn->hop_count = hop_count;
}

/* Lists the redirected socket `cookie` (see maps.h) in one write; returns
 * 1 when the entry was written, 0 when the map is full (counted). */
static __always_inline int conns_track(__u64 cookie, const struct connredir_sock_state *state,
				       __u32 hop_count, __u8 protocol)
{
	struct connredir_conn conn = {};

	conns_fill(&conn, state, hop_count, protocol);
	if (bpf_map_update_elem(&conns, &cookie, &conn, BPF_ANY)) {
		count(CONNREDIR_CNT_CONNS_UNTRACKED);
		return 0;
	}
	return 1;
}

/*
 * The entry of the socket `cookie`, added blank (from conn_blank) when it
 * has none, to be filled in place with conns_fill(): for the connect
 * programs, whose stack, taken by decide(), has no room for an entry.
 * NULL when the map is full (counted).
 */
static __always_inline struct connredir_conn *conns_entry(__u64 cookie)
{
	struct connredir_conn *listed = bpf_map_lookup_elem(&conns, &cookie);
	const struct connredir_conn *blank;
	__u32 zero = 0;

	if (listed)
		return listed;
	blank = bpf_map_lookup_elem(&conn_blank, &zero);
	if (!blank)
		return NULL;
	/* NOEXIST: another thread of the socket's may have added it since. */
	bpf_map_update_elem(&conns, &cookie, blank, BPF_NOEXIST);
	listed = bpf_map_lookup_elem(&conns, &cookie);
	if (!listed)
		count(CONNREDIR_CNT_CONNS_UNTRACKED);
	return listed;
}

/* The socket `cookie` is no longer a redirected leg. */
static __always_inline void conns_forget(__u64 cookie)
{
	bpf_map_delete_elem(&conns, &cookie);
}

#endif /* CONNREDIR_CONNS_H */
