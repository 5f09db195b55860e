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
 */
#include "common.h"

static __always_inline void pair_key(struct connredir_pair_key *key, const __u32 local[4],
				     __u16 local_port, const __u32 remote[4], __u16 remote_port)
{
	__builtin_memcpy(key->local_addr, local, 16);
	__builtin_memcpy(key->remote_addr, remote, 16);
	key->local_port = local_port;
	key->remote_port = remote_port;
}

static __always_inline int is_loopback(const __u32 addr[4])
{
	/* 127.0.0.0/8 as IPv4-mapped, or ::1. */
	if (is_v4_mapped(addr))
		return (bpf_ntohl(addr[3]) >> 24) == 127;
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* Does the service listening at `addr`:`port` ask for acceleration? */
static __always_inline int service_accelerates(const __u32 addr[4], __u16 port)
{
	struct connredir_addr_key key = {};
	struct connredir_service *service;
	__u32 *id;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	id = bpf_map_lookup_elem(&service_addrs, &key);
	if (!id)
		return 0;
	service = bpf_map_lookup_elem(&services, id);
	return service && (service->flags & CONNREDIR_SERVICE_ACCELERATE);
}

static __always_inline void accel_join(struct bpf_sock_ops *skops, const struct tuple *tp,
				       __u32 cb_flags)
{
	struct connredir_pair_key key = {};
	const struct tuple t = *tp;
	__u32 fresh = 0;

	pair_key(&key, t.local, t.local_port, t.remote, t.remote_port);
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

/* ACTIVE_ESTABLISHED_CB: a connecting socket that may join. */
static __always_inline void accel_on_active(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					    const struct tuple *tp, __u32 cb_flags)
{
	const struct tuple t = *tp;
	struct connredir_sock_state *state;
	int join;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return;
	join = service_accelerates(t.remote, t.remote_port) ||
	       ((state->flags & CONNREDIR_SOCK_ACCEL_ONWARD) && is_loopback(t.remote));
	if (join)
		accel_join(skops, tp, cb_flags);
}

/* PASSIVE_ESTABLISHED_CB: the accepting end joins when its peer did. */
static __always_inline void accel_on_passive(struct bpf_sock_ops *skops, const struct tuple *tp,
					     __u32 cb_flags)
{
	struct connredir_pair_key peer = {};
	const struct tuple t = *tp;

	pair_key(&peer, t.remote, t.remote_port, t.local, t.local_port);
	if (bpf_map_lookup_elem(&accel_state, &peer))
		accel_join(skops, tp, cb_flags);
}

static __always_inline void accel_on_close(const struct tuple *tp)
{
	struct connredir_pair_key key = {};
	const struct tuple t = *tp;

	pair_key(&key, t.local, t.local_port, t.remote, t.remote_port);
	bpf_map_delete_elem(&accel_state, &key);
}

/* Is the socket of a getsockopt caller accelerated? */
static __always_inline int accel_socket(struct bpf_sock *sk)
{
	struct connredir_pair_key key = {};
	__u32 src_port = ctx_read(sk->src_port);
	__u16 dst_port = ctx_read(sk->dst_port);
	struct tuple t;

	read_addrs(sk, &t, src_ip4, dst_ip4, src_ip6, dst_ip6);
	pair_key(&key, t.local, (__u16)src_port, t.remote, bpf_ntohs(dst_port));
	return bpf_map_lookup_elem(&accel_state, &key) != NULL;
}

SEC("sk_msg")
int connredir_accel(struct sk_msg_md *msg)
{
	struct connredir_pair_key self = {}, peer = {};
	__u32 remote_port = ctx_read(msg->remote_port);
	__u32 local_port = ctx_read(msg->local_port);
	/* As in sockops: the network-order port sits in the upper 16 bits. */
	__u16 lport = (__u16)local_port, rport = bpf_ntohs((__u16)(remote_port >> 16));
	struct tuple t;
	__u32 *state;

	read_addrs(msg, &t, local_ip4, remote_ip4, local_ip6, remote_ip6);
	pair_key(&self, t.local, lport, t.remote, rport);
	pair_key(&peer, t.remote, rport, t.local, lport);

	state = bpf_map_lookup_elem(&accel_state, &self);
	if (!state || (*state & CONNREDIR_ACCEL_PASSED))
		return SK_PASS;
	if (!bpf_map_lookup_elem(&accel_state, &peer)) {
		/* The peer is not (yet) in the map: this socket stays on TCP. */
		*state |= CONNREDIR_ACCEL_PASSED;
		count(CONNREDIR_CNT_ACCEL_PASSED);
		return SK_PASS;
	}
	count(CONNREDIR_CNT_ACCEL_SENDS);
	return bpf_msg_redirect_hash(msg, &accel_socks, &peer, BPF_F_INGRESS);
}
