/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * sockops: the TCP events of every socket in the attached cgroups, passed
 * on by event to the record hand-off (lib/handoff.h), records-less
 * inheritance (lib/inherit.h) and acceleration (lib/accel.h).
 *
 * The kernel calls this program for several events of every TCP socket in
 * the scope whatever the socket asked for (TIMEOUT_INIT, RWND_INIT,
 * NEEDS_ECN, TCP_CONNECT, ACTIVE_ESTABLISHED, PASSIVE_ESTABLISHED), and for
 * the others (STATE) only on sockets that asked through
 * bpf_sock_ops_cb_flags_set. Most sockets are never redirected, so each
 * event first asks the cheapest question that tells whether this socket
 * has work (does it carry a state at all?) and reads its addresses and
 * namespace only then.
 */
#include "lib/accel.h"
#include "lib/addr.h"
#include "lib/handoff.h"
#include "lib/inherit.h"

/* TCP_CONNECT_CB: a socket the connect program redirected hands its
 * record on; any other socket has nothing to do. */
static __always_inline int on_connect(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct connredir_sock_state *state;
	struct tuple t = {};

	if (!sk)
		return 1;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return 1;
	/* An inherited record goes back if this connect fails (on_state). */
	if (state->flags & CONNREDIR_SOCK_INHERITED)
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
	if (!(state->flags & CONNREDIR_SOCK_HANDOFF_PENDING))
		return 1;
	read_tuple(skops, &t);
	handoff_on_connect(skops, sk, state, bpf_get_netns_cookie(skops), &t,
			   skops->bpf_sock_ops_cb_flags);
	return 1;
}

/* The state of a socket that holds only the one-hop form of its record
 * (lib/handoff.h): none of the acceleration's flags. */
static const struct connredir_sock_state no_state;

/* ACTIVE_ESTABLISHED_CB: only a socket with a state (redirected, or a
 * service's onward socket) may join the acceleration; a redirected one
 * may hold its record's one-hop form instead (lib/handoff.h). */
static __always_inline int on_active(struct bpf_sock_ops *skops)
{
	const struct connredir_sock_state *state;
	struct bpf_sock *sk = skops->sk;
	struct tuple t = {};

	if (!sk)
		return 1;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state) {
		if (!bpf_sk_storage_get(&sock_hop, sk, 0, 0))
			return 1;
		state = &no_state;
	}
	read_tuple(skops, &t);
	accel_on_active(skops, state, bpf_get_netns_cookie(skops), &t,
			skops->bpf_sock_ops_cb_flags);
	return 1;
}

/* PASSIVE_ESTABLISHED_CB: an accepted socket, which may be owed a record. */
static __always_inline int on_passive(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	__u32 cb_flags = skops->bpf_sock_ops_cb_flags;
	struct tuple t = {};
	__u64 netns;

	read_tuple(skops, &t);
	/* Every key that names a socket by address carries its namespace. */
	netns = bpf_get_netns_cookie(skops);
	/* Closing removes what a records-less service kept (lib/inherit.h). */
	if (sk && handoff_on_passive_established(sk, netns, &t)) {
		cb_flags |= BPF_SOCK_OPS_STATE_CB_FLAG;
		bpf_sock_ops_cb_flags_set(skops, cb_flags);
	}
	accel_on_passive(skops, netns, &t, cb_flags);
	return 1;
}

/*
 * STATE_CB, asked for only by sockets that left something behind: at close,
 * each part removes what this socket made. The socket's state tells which:
 * only a socket whose own connect was redirected (CONNREDIR_SOCK_OWN_HOP,
 * in its state or its record's one-hop form) made hand-off and `conns` entries, only one that answered
 * SO_ORIGINAL_DST (CONNREDIR_SOCK_INHERIT_KEPT) kept records; an
 * accelerated socket may have no state at all, so that part always looks.
 */
static __always_inline int on_state(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct connredir_sock_state *state = NULL;
	struct connredir_sock_hop *small = NULL;
	struct tuple t = {};
	__u32 flags = 0;
	__u64 netns;

	if (skops->args[1] != TCP_CLOSE)
		return 1;
	read_tuple(skops, &t);
	netns = bpf_get_netns_cookie(skops);
	if (sk) {
		state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
		small = bpf_sk_storage_get(&sock_hop, sk, 0, 0);
	}
	if (state)
		flags = state->flags;
	if (small)
		flags |= small->flags;
	if (flags & CONNREDIR_SOCK_OWN_HOP)
		handoff_on_close(skops, netns, &t);
	if (state && skops->args[0] == TCP_SYN_SENT)
		inherit_give_back(state, netns);
	if (state)
		inherit_on_close(state, netns);
	if (small)
		inherit_on_close_hop(small, netns);
	accel_on_close(sk, netns, &t);
	return 1;
}

SEC("sockops")
int connredir_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		return on_connect(skops);
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		return on_active(skops);
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return on_passive(skops);
	case BPF_SOCK_OPS_STATE_CB:
		return on_state(skops);
	}
	return 1;
}
