/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cgroup/getsockname4|6: for a service registered as transparent
 * (CONNREDIR_SERVICE_TRANSPARENT), the socket it accepted for a redirected
 * flow names the flow's original destination as its local address, as a
 * TPROXY socket does. Proxies that read the destination there instead of
 * asking SO_ORIGINAL_DST (haproxy's `option transparent` on IPv6, and
 * proxies written for TPROXY) then forward where the client was going. The
 * answer keeps the record for the asker's onward connect exactly as
 * SO_ORIGINAL_DST does (lib/inherit.h), so such a proxy chains without
 * loops. Every other socket is left as it is, at the cost of one array
 * read while no service is transparent.
 */
#include "lib/addr.h"
#include "lib/inherit.h"
#include "lib/record.h"

/*
 * Whether no service is registered transparent: then no socket has work
 * here, and the program returns before any socket-storage lookup. The
 * engine keeps the count at or above the truth (maps.h in the ABI), so a
 * 0 is never wrong; a missing entry (it cannot be, the array has one)
 * counts as "some", which only costs the full work.
 */
static __always_inline int no_transparent_service(void)
{
	__u32 zero = 0;
	__u32 *count = bpf_map_lookup_elem(&transparent_count, &zero);

	return count && *count == 0;
}

/* Where an accepted socket's record is (its state, or its one-hop form). */
struct accepted {
	struct connredir_sock_state *state;
	struct connredir_sock_hop *small;
};

/* The original destination a socket a transparent service accepted
 * answers with, or NULL. */
static __always_inline const struct connredir_endpoint *transparent_local(struct bpf_sock_addr *ctx,
									 struct accepted *at)
{
	struct bpf_sock *sk = ctx->sk;
	struct connredir_service *service;
	const struct connredir_hop *hop;
	__u32 hops, flags, service_id;

	if (no_transparent_service() || !sk || ctx->type != SOCK_STREAM)
		return NULL;
	at->state = record_holder(sk, &at->small);
	if (at->state) {
		flags = at->state->flags;
		hops = clamp_hops(at->state->record.hop_count);
		if (hops == 0)
			return NULL;
		hop = &at->state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)];
	} else if (at->small) {
		flags = at->small->flags;
		hop = &at->small->hop;
	} else {
		return NULL;
	}
	if (!(flags & CONNREDIR_SOCK_ACCEPTED))
		return NULL;
	service_id = hop->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service || !(service->flags & CONNREDIR_SERVICE_TRANSPARENT))
		return NULL;
	return &hop->original_dst;
}

/* Keeps the record for the asker's onward connect, as SO_ORIGINAL_DST. */
static __always_inline void keep(struct bpf_sock_addr *ctx, const struct accepted *at,
				 const struct connredir_endpoint *original)
{
	__u64 netns = bpf_get_netns_cookie(ctx);

	if (at->state)
		inherit_keep(netns, at->state, original);
	else if (at->small)
		inherit_keep_hop(netns, at->small, original);
}

SEC("cgroup/getsockname4")
int connredir_getsockname4(struct bpf_sock_addr *ctx)
{
	struct accepted at = {};
	const struct connredir_endpoint *original = transparent_local(ctx, &at);

	if (!original || original->family != AF_INET)
		return 1;
	set_user_addr4(ctx, original);
	keep(ctx, &at, original);
	return 1;
}

SEC("cgroup/getsockname6")
int connredir_getsockname6(struct bpf_sock_addr *ctx)
{
	struct accepted at = {};
	const struct connredir_endpoint *original = transparent_local(ctx, &at);

	if (!original)
		return 1;
	/* An IPv4 destination reached from an IPv6 socket: IPv4-mapped. */
	set_user_addr6(ctx, original);
	keep(ctx, &at, original);
	return 1;
}
