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
 * loops. Every other socket is left as it is: its state is looked up, once.
 */
#include "lib/addr.h"
#include "lib/inherit.h"

/* The original destination an accepted socket of a transparent service
 * answers with, or NULL; `*state_out` is its state. */
static __always_inline const struct connredir_endpoint *
transparent_local(struct bpf_sock_addr *ctx, struct connredir_sock_state **state_out)
{
	struct bpf_sock *sk = ctx->sk;
	struct connredir_sock_state *state;
	struct connredir_service *service;
	struct connredir_hop *hop;
	__u32 hops, service_id;

	if (!sk || ctx->type != SOCK_STREAM)
		return NULL;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state || !(state->flags & CONNREDIR_SOCK_ACCEPTED))
		return NULL;
	hops = clamp_hops(state->record.hop_count);
	if (hops == 0)
		return NULL;
	hop = &state->record.hops[(hops - 1) & (CONNREDIR_MAX_HOPS - 1)];
	service_id = hop->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service || !(service->flags & CONNREDIR_SERVICE_TRANSPARENT))
		return NULL;
	*state_out = state;
	return &hop->original_dst;
}

SEC("cgroup/getsockname4")
int connredir_getsockname4(struct bpf_sock_addr *ctx)
{
	struct connredir_sock_state *state = NULL;
	const struct connredir_endpoint *original = transparent_local(ctx, &state);

	if (!original || !state || original->family != AF_INET)
		return 1;
	ctx->user_ip4 = *(const __u32 *)original->addr;
	ctx->user_port = original->port;
	inherit_keep(bpf_get_netns_cookie(ctx), state, original);
	return 1;
}

SEC("cgroup/getsockname6")
int connredir_getsockname6(struct bpf_sock_addr *ctx)
{
	struct connredir_sock_state *state = NULL;
	const struct connredir_endpoint *original = transparent_local(ctx, &state);
	__u32 ip6[4];

	if (!original || !state)
		return 1;
	/* An IPv4 destination reached from an IPv6 socket: IPv4-mapped. */
	endpoint_to_mapped(original, ip6);
	ctx->user_ip6[0] = ip6[0];
	ctx->user_ip6[1] = ip6[1];
	ctx->user_ip6[2] = ip6[2];
	ctx->user_ip6[3] = ip6[3];
	ctx->user_port = original->port;
	inherit_keep(bpf_get_netns_cookie(ctx), state, original);
	return 1;
}
