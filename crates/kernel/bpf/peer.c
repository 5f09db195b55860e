/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What a redirected client sees of its peer (lib/peer.h): a connected
 * socket's peer is the original destination (cgroup/getpeername4|6), and a
 * UDP datagram from the service's address reads as coming from it
 * (cgroup/recvmsg4|6).
 *
 * A service's own processes see their real peer on TCP sockets: the
 * service names its onward socket to the layer by that socket's 4-tuple
 * (cut-through, accel.h), and a socket a service connected onward is
 * redirected too when a later service takes the flow.
 */
#include "lib/addr.h"
#include "lib/peer.h"
#include "lib/service.h"

/* Whether the calling process is one of a service's (by any identity). */
static __always_inline int caller_is_a_service(void)
{
	struct caller_services caller;

	caller_services(&caller);
	return caller.by_pid || caller.by_cgroup || caller.by_uid;
}

/* The original destination to show in place of `from` on `sk`, or NULL. */
static __always_inline const struct connredir_endpoint *
shown_peer(struct bpf_sock *sk, __u32 type, const struct connredir_endpoint *from)
{
	const struct connredir_endpoint *original;

	if (type != SOCK_DGRAM && type != SOCK_STREAM)
		return NULL;
	/* A TCP socket's peer is looked at first: every accept() asks for the
	 * peer too, and a service's accepted socket holds storage that costs
	 * more to search than this one lookup, while its peer is never a
	 * service. (A UDP socket without storage is cheaper the other way.) */
	if (type == SOCK_STREAM && !is_service_endpoint(from))
		return NULL;
	original = original_peer(sk, from);
	if (original && type == SOCK_STREAM && caller_is_a_service())
		return NULL;
	return original;
}

static __always_inline int peer4(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *original;
	struct connredir_endpoint from;

	if (!sk)
		return 1;
	endpoint_set_v4(&from, ip, port);
	original = shown_peer(sk, type, &from);
	if (original && original->family == AF_INET)
		set_user_addr4(ctx, original);
	return 1;
}

static __always_inline int peer6(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *original;
	struct connredir_endpoint from;
	__u32 ip6[4];

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (!sk)
		return 1;
	endpoint_set_v6(&from, ip6, port);
	original = shown_peer(sk, type, &from);
	if (original)
		set_user_addr6(ctx, original);
	return 1;
}

SEC("cgroup/recvmsg4")
int connredir_recvmsg4(struct bpf_sock_addr *ctx)
{
	return peer4(ctx);
}

SEC("cgroup/recvmsg6")
int connredir_recvmsg6(struct bpf_sock_addr *ctx)
{
	return peer6(ctx);
}

SEC("cgroup/getpeername4")
int connredir_getpeername4(struct bpf_sock_addr *ctx)
{
	return peer4(ctx);
}

SEC("cgroup/getpeername6")
int connredir_getpeername6(struct bpf_sock_addr *ctx)
{
	return peer6(ctx);
}
