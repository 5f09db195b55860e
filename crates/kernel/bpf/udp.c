/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What a redirected UDP client sees of its peer (see lib/udp.h): datagrams
 * from the service's address read as coming from the original destination
 * (cgroup/recvmsg4|6), and a connected socket's peer is the original
 * destination (cgroup/getpeername4|6). TCP sockets are left as they are.
 */
#include "lib/addr.h"
#include "lib/udp.h"

static __always_inline int peer4(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *original;
	struct connredir_endpoint from;

	if (type != SOCK_DGRAM || !sk)
		return 1;
	endpoint_set_v4(&from, ip, port);
	original = udp_original_peer(sk, &from);
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
	if (type != SOCK_DGRAM || !sk)
		return 1;
	endpoint_set_v6(&from, ip6, port);
	original = udp_original_peer(sk, &from);
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
