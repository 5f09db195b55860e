/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * UDP flows: a flow is a client socket and the original destination it
 * sent to. The client's connect() is decided as for TCP (connect.c, with
 * the rules for UDP) and its record kept in the client socket's storage;
 * its destination becomes the service's UDP address (the service's
 * listening address and port, on UDP).
 *
 * UDP has no accept(): a service answers a client from a socket of its
 * own, bound to the service's address (SO_REUSEADDR/SO_REUSEPORT) and
 * connected to the client's address. That connect (udp_take_flow, called
 * from connect.c) finds the client's socket in the caller's network
 * namespace (bpf_sk_lookup_udp, the 4-tuple seen from the service) and
 * copies its record onto the service's socket, which then answers the
 * socket options as an accepted TCP socket does.
 *
 * The client cannot tell: a datagram from the service's address reads as
 * coming from the original destination (recvmsg4/6), and a connected
 * socket's peer is the original destination (getpeername4/6); both in
 * peer.c (lib/peer.h original_peer), as for TCP.
 *
 * A redirected UDP socket is a leg in the conns list from the connect() or
 * sendto() that redirected it (udp_track) until it is released (release.c)
 * or a later decision leaves it without a redirect of its own
 * (udp_untrack): there is no connection event between the two.
 */
#ifndef CONNREDIR_UDP_H
#define CONNREDIR_UDP_H

#include "addr.h"
#include "maps.h"
#include "record.h"
#include "service.h"
#include "conns.h"
#include "peer.h"

/*
 * A service's socket bound to its own address connects to `peer`, a
 * client: when that client's socket holds a flow redirected to this
 * service, the flow's record becomes this socket's (as on an accepted TCP
 * socket), with the client's address as the last hop's local address.
 * Returns 1 when the socket took a flow (the connect is then left as it
 * is), 0 when it is not a service's socket or no flow of its is there.
 *
 * Only the service's processes (or root) can hold a socket bound to its
 * address: bind.c refuses that address to anyone else in the scope.
 */
static __always_inline int udp_take_flow(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
					 const struct connredir_endpoint *peer)
{
	__u32 family = ctx_read(sk->family);
	__u32 src_port = ctx_read(sk->src_port);
	__u32 src4 = ctx_read(sk->src_ip4);
	__u32 local[4];
	struct bpf_sock_tuple tuple = {};
	struct caller_services caller;
	struct connredir_sock_state *theirs, *ours;
	struct connredir_hop *hop;
	struct bpf_sock *client;
	__u32 service_id, hop_count;
	int taken = 0;

	local[0] = ctx_read(sk->src_ip6[0]);
	local[1] = ctx_read(sk->src_ip6[1]);
	local[2] = ctx_read(sk->src_ip6[2]);
	local[3] = ctx_read(sk->src_ip6[3]);
	if (family == AF_INET) {
		local[0] = 0;
		local[1] = 0;
		local[2] = bpf_htonl(0xffff);
		local[3] = src4;
	}
	if (!src_port)
		return 0;
	service_id = service_at(local, (__u16)src_port);
	if (!service_id)
		return 0;
	caller_services(&caller);
	if (caller.uid != 0 && !caller_is(&caller, service_id))
		return 0;

	/* The client's socket is the one that receives what this socket sends. */
	if (peer->family == AF_INET) {
		if (!is_v4_mapped(local))
			return 0;
		tuple.ipv4.saddr = local[3];
		tuple.ipv4.sport = bpf_htons((__u16)src_port);
		tuple.ipv4.daddr = *(const __u32 *)peer->addr;
		tuple.ipv4.dport = peer->port;
		client = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, local, 16);
		tuple.ipv6.sport = bpf_htons((__u16)src_port);
		__builtin_memcpy(tuple.ipv6.daddr, peer->addr, 16);
		tuple.ipv6.dport = peer->port;
		client = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!client)
		return 0;
	theirs = bpf_sk_storage_get(&sock_state, client, 0, 0);
	if (theirs && (theirs->flags & CONNREDIR_SOCK_OWN_HOP)) {
		hop_count = clamp_hops(theirs->record.hop_count);
		if (hop_count > 0 &&
		    theirs->record.hops[(hop_count - 1) & (CONNREDIR_MAX_HOPS - 1)].service_id ==
			    service_id) {
			ours = bpf_sk_storage_get(&sock_state, sk, 0,
						  BPF_SK_STORAGE_GET_F_CREATE);
			if (ours) {
				ours->record = theirs->record;
				hop = &ours->record.hops[(hop_count - 1) &
							 (CONNREDIR_MAX_HOPS - 1)];
				hop->local = *peer;
				ours->flags = CONNREDIR_SOCK_ACCEPTED;
				ours->pid = theirs->pid;
				ours->uid = theirs->uid;
				ours->cgroup_id = theirs->cgroup_id;
				taken = 1;
			}
		}
	}
	bpf_sk_release(client);
	return taken;
}

/* The socket's bound address as an endpoint; all zero while it has no port
 * (a connect() before any bind: the port comes after the connect hook). */
static __always_inline void udp_local(struct bpf_sock *sk, struct connredir_endpoint *ep)
{
	__u32 family = ctx_read(sk->family);
	__u32 port = ctx_read(sk->src_port);
	__u32 ip6[4];

	__builtin_memset(ep, 0, sizeof(*ep));
	if (!port)
		return;
	if (family == AF_INET) {
		endpoint_set_v4(ep, ctx_read(sk->src_ip4), bpf_htons((__u16)port));
		return;
	}
	ip6[0] = ctx_read(sk->src_ip6[0]);
	ip6[1] = ctx_read(sk->src_ip6[1]);
	ip6[2] = ctx_read(sk->src_ip6[2]);
	ip6[3] = ctx_read(sk->src_ip6[3]);
	endpoint_set_v6(ep, ip6, bpf_htons((__u16)port));
}

/*
 * After decide() redirected the UDP socket `sk`: its leg in the conns list,
 * with its bound address as this hop's local address (and, on the flow's
 * first socket, as the flow's client). An unconnected socket is decided at
 * every sendto(): the entry is written only when the flow changed (another
 * destination, chain or local address), so it keeps the time of the
 * flow's first redirect and a steady sender pays one lookup per datagram.
 */
static __always_inline void udp_track(struct bpf_sock_addr *ctx, struct bpf_sock *sk)
{
	struct connredir_sock_state *state;
	struct connredir_conn *listed;
	struct connredir_hop *hop;
	__u32 hop_count, last;
	__u64 cookie;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state || !(state->flags & CONNREDIR_SOCK_OWN_HOP))
		return;
	hop_count = clamp_hops(state->record.hop_count);
	if (hop_count == 0)
		return;
	last = (hop_count - 1) & (CONNREDIR_MAX_HOPS - 1);
	hop = &state->record.hops[last];
	udp_local(sk, &hop->local);
	cookie = bpf_get_socket_cookie(ctx);
	listed = bpf_map_lookup_elem(&conns, &cookie);
	if (listed && listed->hop_count == hop_count && listed->chain[last] == hop->service_id &&
	    listed->local.port == hop->local.port &&
	    same_endpoint(&listed->original_dst, &hop->original_dst))
		return;
	listed = conns_entry(cookie);
	if (listed)
		conns_fill(listed, state, hop_count, CONNREDIR_PROTO_UDP);
}

/* After a decision that left the UDP socket `sk` without a redirect of its
 * own (its earlier one taken back): it is no longer a leg. */
static __always_inline void udp_untrack(struct bpf_sock_addr *ctx, struct bpf_sock *sk)
{
	struct connredir_sock_state *state = bpf_sk_storage_get(&sock_state, sk, 0, 0);

	if (state && !(state->flags & CONNREDIR_SOCK_OWN_HOP))
		conns_forget(bpf_get_socket_cookie(ctx));
}

#endif /* CONNREDIR_UDP_H */
