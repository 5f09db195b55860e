/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What a redirected client sees of its peer: the original destination, not
 * the service, as behind a NAT redirect. Clients ask (getpeername), and
 * some act on the answer: Python's ftplib opens its passive data
 * connections to its control connection's peer. A UDP client also reads
 * the source of each datagram (recvmsg). The programs are in peer.c; the
 * UDP send path (connect.c) asks too, to pass a datagram to the service
 * address a socket was already redirected to.
 */
#ifndef CONNREDIR_PEER_H
#define CONNREDIR_PEER_H

#include "addr.h"
#include "maps.h"
#include "record.h"
#include "service.h"

/* Whether `a` is the service endpoint `b` (address and port). */
static __always_inline int same_endpoint(const struct connredir_endpoint *a,
					 const struct connredir_endpoint *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;

	if (a->family != b->family || a->port != b->port || x[0] != y[0])
		return 0;
	return a->family == AF_INET || (x[1] == y[1] && x[2] == y[2] && x[3] == y[3]);
}

/* Whether `from` is a service's address (one lookup by address). */
static __always_inline int is_service_endpoint(const struct connredir_endpoint *from)
{
	__u32 addr[4];

	endpoint_to_mapped(from, addr);
	return service_at(addr, bpf_ntohs(from->port)) != 0;
}

/*
 * The original destination to show in place of `from` on a client's
 * socket: when the socket's own connect (or UDP send) redirected it and
 * `from` is that redirect's service address. NULL to leave `from` as it
 * is. The hop is in the socket's state, or in its one-hop form once a TCP
 * socket handed its record on (handoff.h).
 */
static __always_inline const struct connredir_endpoint *
original_peer(struct bpf_sock *sk, const struct connredir_endpoint *from)
{
	struct connredir_sock_state *state;
	struct connredir_sock_hop *small;
	const struct connredir_hop *hop;
	struct connredir_service *service;
	__u32 hop_count, service_id;

	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (state) {
		if (!(state->flags & CONNREDIR_SOCK_OWN_HOP))
			return NULL;
		hop_count = clamp_hops(state->record.hop_count);
		if (hop_count == 0)
			return NULL;
		hop = &state->record.hops[(hop_count - 1) & (CONNREDIR_MAX_HOPS - 1)];
	} else {
		small = bpf_sk_storage_get(&sock_hop, sk, 0, 0);
		if (!small || !(small->flags & CONNREDIR_SOCK_OWN_HOP))
			return NULL;
		hop = &small->hop;
	}
	service_id = hop->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service)
		return NULL;
	if (!same_endpoint(from, from->family == AF_INET ? &service->listen4 : &service->listen6))
		return NULL;
	return &hop->original_dst;
}

#endif /* CONNREDIR_PEER_H */
