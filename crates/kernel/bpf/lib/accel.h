/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Sockmap acceleration: when both ends of a local TCP connection are known,
 * data written on one end goes straight to the other end's receive queue
 * (sk_msg + bpf_msg_redirect_hash into the peer's ingress), skipping the TCP
 * stack, as merbridge does.
 *
 * Which sockets join (sockops, at connection establishment, before data):
 *  - a redirected socket whose service asked for acceleration (active side);
 *  - the onward socket of such a service, toward a loopback destination;
 *  - the accepting end of a connection whose connecting end joined
 *    (passive side), so a pair is only ever complete, never half.
 * A socket that has written through TCP before its peer joined stays on TCP
 * (CONNREDIR_ACCEL_PASSED): its later data must not overtake the earlier.
 * Sockets are keyed by network namespace and 4-tuple, so a socket is only
 * ever joined with its real peer, never with one of another namespace that
 * uses the same addresses.
 *
 * Cut-through (CONNREDIR_SO_CUT_THROUGH): once the service has inspected a
 * flow, what its peer writes into one of its sockets goes to the far socket
 * directly. Ordering rests on one 64-bit word per receiving socket,
 * `arrived`: the sk_msg program adds each write's size to it atomically and
 * reads, in the same step, whether the cut-through bit is set; the service
 * sets that bit with a compare-and-swap that succeeds only while `arrived`
 * equals what the service has read. So a write either was counted before
 * the switch (the service reads and forwards it, then asks again) or comes
 * after it (it goes straight to the far end, behind everything the service
 * forwarded). The count stays with the service's socket, which outlives
 * the peer's close, so the service can read the flow's total at EOF.
 *
 * Everything of it is here; the entry files only call in: sockops.c at
 * establishment and close (accel_on_active, accel_on_passive,
 * accel_on_close), sk_msg.c for each write (accel_on_msg), sockopt.c for
 * CONNREDIR_SO_ACCELERATED, _CUT_THROUGH, _BYTES_WRITTEN and, when a service
 * sets the records of its onward socket, caller_accelerates.
 */
#ifndef CONNREDIR_ACCEL_H
#define CONNREDIR_ACCEL_H

#include "maps.h"
#include "addr.h"
#include "trace.h"
#include "service.h"

static __always_inline void pair_key(struct connredir_pair_key *key, __u64 netns,
				     const __u32 local[4], __u16 local_port,
				     const __u32 remote[4], __u16 remote_port)
{
	key->netns = netns;
	__builtin_memcpy(key->tuple.local_addr, local, 16);
	__builtin_memcpy(key->tuple.remote_addr, remote, 16);
	key->tuple.local_port = local_port;
	key->tuple.remote_port = remote_port;
	key->reserved = 0;
}

static __always_inline int is_loopback(const __u32 addr[4])
{
	/* 127.0.0.0/8 as IPv4-mapped, or ::1. */
	if (is_v4_mapped(addr))
		return (bpf_ntohl(addr[3]) >> 24) == 127;
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* The key of the socket at the other end of `in`'s 4-tuple, in `netns`. */
static __always_inline void swap_key(struct connredir_pair_key *out, __u64 netns,
				     const struct connredir_sock_tuple *in)
{
	out->netns = netns;
	__builtin_memcpy(out->tuple.local_addr, in->remote_addr, 16);
	__builtin_memcpy(out->tuple.remote_addr, in->local_addr, 16);
	out->tuple.local_port = in->remote_port;
	out->tuple.remote_port = in->local_port;
	out->reserved = 0;
}

/* Does the service listening at `addr`:`port` ask for acceleration? */
static __always_inline int service_accelerates(const __u32 addr[4], __u16 port)
{
	struct connredir_service *service;
	__u32 id = service_at(addr, port);

	if (!id)
		return 0;
	service = bpf_map_lookup_elem(&services, &id);
	return service && (service->flags & CONNREDIR_SERVICE_ACCELERATE);
}

static __always_inline void accel_join(struct bpf_sock_ops *skops, __u64 netns,
				       const struct tuple *tp, __u32 cb_flags, __u32 owner)
{
	struct connredir_accel_state fresh = { .owner = owner };
	struct connredir_pair_key key = {};
	const struct tuple t = *tp;

	pair_key(&key, netns, t.local, t.local_port, t.remote, t.remote_port);
	if (bpf_map_update_elem(&accel_state, &key, &fresh, BPF_NOEXIST))
		return;
	if (bpf_sock_hash_update(skops, &accel_socks, &key, BPF_NOEXIST)) {
		bpf_map_delete_elem(&accel_state, &key);
		return;
	}
	/* Closing removes the state entry (the sockhash drops closed sockets). */
	bpf_sock_ops_cb_flags_set(skops, cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	count(CONNREDIR_CNT_ACCEL_JOINED);
}

/* ACTIVE_ESTABLISHED_CB: a connecting socket with a state that may join. */
static __always_inline void accel_on_active(struct bpf_sock_ops *skops,
					    const struct connredir_sock_state *state, __u64 netns,
					    const struct tuple *tp, __u32 cb_flags)
{
	const struct tuple t = *tp;
	int join, onward;

	onward = state->flags & CONNREDIR_SOCK_ACCEL_ONWARD;
	join = service_accelerates(t.remote, t.remote_port) || (onward && is_loopback(t.remote));
	/* An onward socket is its service's; a redirected client's is no one's. */
	if (join)
		accel_join(skops, netns, tp, cb_flags, onward ? state->onward_service : 0);
}

/* PASSIVE_ESTABLISHED_CB: the accepting end joins when its peer did. */
static __always_inline void accel_on_passive(struct bpf_sock_ops *skops, __u64 netns,
					     const struct tuple *tp, __u32 cb_flags)
{
	struct connredir_pair_key peer = {};
	const struct tuple t = *tp;

	pair_key(&peer, netns, t.remote, t.remote_port, t.local, t.local_port);
	/* Accepted on a service's address: that service's socket. */
	if (bpf_map_lookup_elem(&accel_state, &peer))
		accel_join(skops, netns, tp, cb_flags, service_at(t.local, t.local_port));
}

static __always_inline void accel_on_close(struct bpf_sock *sk, __u64 netns,
					   const struct tuple *tp)
{
	struct connredir_accel_state *accel;
	struct connredir_pair_key key = {};
	struct connredir_sock_state *state;
	const struct tuple t = *tp;
	__u64 arrived;

	pair_key(&key, netns, t.local, t.local_port, t.remote, t.remote_port);
	accel = bpf_map_lookup_elem(&accel_state, &key);
	if (!accel)
		return;
	arrived = accel->arrived;
	/* A cut-through count outlives the TCP state: its owner reads it at
	 * EOF, which can come after both FINs closed the socket. */
	if ((arrived & CONNREDIR_ACCEL_CUT_THROUGH) && sk) {
		state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (state) {
			state->cut_through_bytes = arrived & ~CONNREDIR_ACCEL_CUT_THROUGH;
			state->flags |= CONNREDIR_SOCK_CUT_COUNTED;
		}
	}
	bpf_map_delete_elem(&accel_state, &key);
}

/* The accel_state key of a sockopt caller's socket, in its namespace. */
static __always_inline void sock_key(struct bpf_sockopt *ctx, struct bpf_sock *sk,
				     struct connredir_pair_key *key)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	__u32 src_port = ctx_read(sk->src_port);
	__u16 dst_port = ctx_read(sk->dst_port);
	struct tuple t;

	read_addrs(sk, &t, src_ip4, dst_ip4, src_ip6, dst_ip6);
	pair_key(key, netns, t.local, (__u16)src_port, t.remote, bpf_ntohs(dst_port));
}

/* Is the socket of a getsockopt caller accelerated? */
static __always_inline int accel_socket(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	struct connredir_pair_key key = {};

	sock_key(ctx, sk, &key);
	return bpf_map_lookup_elem(&accel_state, &key) != NULL;
}

/* CONNREDIR_SO_CUT_THROUGH, set (see abi.h): 0 or a negative errno. */
static __always_inline int accel_cut_through(struct bpf_sockopt *ctx, struct bpf_sock *sk,
					     const struct connredir_cut_through *req)
{
	struct connredir_pair_key key = {}, writer_key = {}, to_key = {}, far_key = {};
	struct connredir_accel_state *own, *writer, *to, *far;
	struct caller_services caller;
	__u64 received = req->received;

	sock_key(ctx, sk, &key);
	own = bpf_map_lookup_elem(&accel_state, &key);
	swap_key(&writer_key, key.netns, &key.tuple);
	writer = bpf_map_lookup_elem(&accel_state, &writer_key);
	/* The caller names its other socket by 4-tuple only: it is looked up
	 * in this socket's namespace, never one the caller chooses. */
	to_key.netns = key.netns;
	to_key.tuple = req->to;
	to = bpf_map_lookup_elem(&accel_state, &to_key);
	swap_key(&far_key, key.netns, &req->to);
	far = bpf_map_lookup_elem(&accel_state, &far_key);
	/* Both writers must be on sockmap from their first byte: data they
	 * sent through TCP would not be counted, or could be overtaken. */
	if (!own || !writer || !to || !far || (writer->flags & CONNREDIR_ACCEL_PASSED) ||
	    (to->flags & CONNREDIR_ACCEL_PASSED))
		return -EOPNOTSUPP;
	caller_services(&caller);
	if (!own->owner || own->owner != to->owner || !caller_is(&caller, own->owner))
		return -EACCES;
	if (received & CONNREDIR_ACCEL_CUT_THROUGH)
		return -EINVAL;
	if (own->arrived & CONNREDIR_ACCEL_CUT_THROUGH)
		return -EALREADY;
	/* Read by the sk_msg program only once the bit is set. */
	own->target = far_key;
	if (__sync_val_compare_and_swap(&own->arrived, received,
					received | CONNREDIR_ACCEL_CUT_THROUGH) != received)
		return -EAGAIN;
	count(CONNREDIR_CNT_CUT_THROUGHS);
	return 0;
}

/* CONNREDIR_SO_BYTES_WRITTEN: the bytes written into `sk`, or -ENOENT. */
static __always_inline __s64 accel_written_into(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	struct connredir_pair_key key = {};
	struct connredir_accel_state *own;
	struct connredir_sock_state *state;

	sock_key(ctx, sk, &key);
	own = bpf_map_lookup_elem(&accel_state, &key);
	if (own)
		return (__s64)(own->arrived & ~CONNREDIR_ACCEL_CUT_THROUGH);
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (state && (state->flags & CONNREDIR_SOCK_CUT_COUNTED))
		return (__s64)state->cut_through_bytes;
	return -ENOENT;
}

/* The caller's service that asks for acceleration, or 0: setsockopt
 * SO_RECORDS marks the onward socket of such a service (SOCK_ACCEL_ONWARD)
 * so that it joins at ACTIVE_ESTABLISHED_CB. */
static __always_inline __u32 caller_accelerates(void)
{
	struct caller_services caller;
	__u32 ids[3];

	caller_services(&caller);
	ids[0] = caller.by_pid;
	ids[1] = caller.by_cgroup;
	ids[2] = caller.by_uid;
	for (int i = 0; i < 3; i++) {
		struct connredir_service *service;
		__u32 id = ids[i];

		if (!id)
			continue;
		service = bpf_map_lookup_elem(&services, &id);
		if (service && (service->flags & CONNREDIR_SERVICE_ACCELERATE))
			return id;
	}
	return 0;
}

/* sk_msg (connredir_accel in sk_msg.c): where a write of an accelerated
 * socket goes. SK_PASS keeps it on TCP. */
static __always_inline int accel_on_msg(struct sk_msg_md *msg)
{
	struct connredir_pair_key self = {}, peer = {}, target;
	__u32 remote_port = ctx_read(msg->remote_port);
	__u32 local_port = ctx_read(msg->local_port);
	__u32 size = ctx_read(msg->size);
	/* As in sockops: the network-order port sits in the upper 16 bits. */
	__u16 lport = (__u16)local_port, rport = bpf_ntohs((__u16)(remote_port >> 16));
	__u64 netns = bpf_get_netns_cookie(msg);
	struct connredir_accel_state *state, *peer_state;
	struct tuple t;
	__u64 arrived;

	read_addrs(msg, &t, local_ip4, remote_ip4, local_ip6, remote_ip6);
	pair_key(&self, netns, t.local, lport, t.remote, rport);
	pair_key(&peer, netns, t.remote, rport, t.local, lport);

	state = bpf_map_lookup_elem(&accel_state, &self);
	if (!state || (state->flags & CONNREDIR_ACCEL_PASSED))
		return SK_PASS;
	peer_state = bpf_map_lookup_elem(&accel_state, &peer);
	if (!peer_state) {
		/* The peer is not (yet) in the map: this socket stays on TCP. */
		state->flags |= CONNREDIR_ACCEL_PASSED;
		count(CONNREDIR_CNT_ACCEL_PASSED);
		return SK_PASS;
	}
	count(CONNREDIR_CNT_ACCEL_SENDS);
	/* Counted and checked in one step: see the cut-through above. */
	arrived = __sync_fetch_and_add(&peer_state->arrived, (__u64)size);
	if (arrived & CONNREDIR_ACCEL_CUT_THROUGH) {
		target = peer_state->target;
		count(CONNREDIR_CNT_CUT_THROUGH_SENDS);
		return bpf_msg_redirect_hash(msg, &accel_socks, &target, BPF_F_INGRESS);
	}
	return bpf_msg_redirect_hash(msg, &accel_socks, &peer, BPF_F_INGRESS);
}

#endif /* CONNREDIR_ACCEL_H */
