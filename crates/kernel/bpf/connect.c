/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cgroup/connect4 and cgroup/connect6: every TCP and UDP connect() in the
 * attached cgroups; cgroup/sendmsg4 and cgroup/sendmsg6: every UDP sendto()
 * or sendmsg() with an address there. The destination is read from the context, decided by
 * decide() (lib/decide.h: the rules of the socket's protocol, the chain, the
 * service's listener) and, when redirected, rewritten to the service's
 * listening address. A UDP connect by a service's own socket to a client
 * takes that client's flow instead (lib/udp.h). A redirected UDP socket is
 * listed in conns here (TCP ones are, by sockops, once connected).
 */
#include "lib/addr.h"
#include "lib/decide.h"
#include "lib/udp.h"

/* The rules' protocol for a socket type; 0 for types never redirected. */
static __always_inline __u32 protocol_of(__u32 type)
{
	return type == SOCK_STREAM ? CONNREDIR_PROTO_TCP :
	       type == SOCK_DGRAM  ? CONNREDIR_PROTO_UDP :
				     0;
}

/*
 * A UDP socket's place in the live-connection list after a decision (TCP
 * sockets are listed by sockops, once connected). A global function,
 * verified once on its own: inlined after decide(), it was walked again on
 * every way out of decide(), past the verifier's budget. It reads the
 * socket type itself so that the caller keeps nothing more alive across
 * decide() (which also costs the verifier its pruning).
 */
__noinline int udp_list(struct bpf_sock_addr *ctx, int verdict)
{
	struct bpf_sock *sk;

	if (!ctx || ctx->type != SOCK_DGRAM)
		return 0;
	sk = ctx->sk;
	if (!sk)
		return 0;
	if (verdict == VERDICT_REDIRECT)
		udp_track(ctx, sk);
	else
		udp_untrack(ctx, sk);
	return 0;
}

/* A refused connect: the errno reaches the caller of connect(), and a
 * record the socket inherited goes back for the caller's next attempt. */
static __always_inline int refuse(struct bpf_sock_addr *ctx, int err)
{
	inherit_return(ctx);
	bpf_set_retval(err);
	return 0;
}

/*
 * A connect (or, with `sending`, a UDP sendto/sendmsg with an address) to an
 * IPv4 destination.
 */
static __always_inline int on_addr4(struct bpf_sock_addr *ctx, int sending)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *target = NULL;
	struct connredir_endpoint dst;
	int verdict, refusal = 0;

	__u32 protocol = protocol_of(type);

	if (!protocol || !sk || (sending && protocol != CONNREDIR_PROTO_UDP))
		return 1;
	if (!ip)
		ip = unspecified4(sending ? ctx->msg_src_ip4 : sk->src_ip4);
	endpoint_set_v4(&dst, ip, port);
	if (!sending && protocol == CONNREDIR_PROTO_UDP && udp_take_flow(ctx, sk, &dst))
		return 1;
	/* Already the socket's redirect: an IPv6 socket's datagram to a
	 * v4-mapped address (its connect was decided by connect6) passes here
	 * with the service's address. */
	if (sending && original_peer(sk, &dst))
		return 1;
	verdict = decide_traced(ctx, sk, &dst, 0, protocol, &target, &refusal);
	udp_list(ctx, verdict);
	if (verdict == VERDICT_REFUSE)
		return refuse(ctx, refusal);
	if (verdict == VERDICT_REDIRECT && target) {
		ctx->user_ip4 = *(const __u32 *)target->addr;
		ctx->user_port = target->port;
	}
	return 1;
}

/* As on_addr4(), for an IPv6 (or IPv4-mapped) destination. */
static __always_inline int on_addr6(struct bpf_sock_addr *ctx, int sending)
{
	__u32 type = ctx->type;
	__u32 ip6[4];
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *target = NULL;
	struct connredir_endpoint dst;
	int mapped, verdict, refusal = 0;
	__u32 protocol = protocol_of(type);

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (!protocol || !sk || (sending && protocol != CONNREDIR_PROTO_UDP))
		return 1;
	if (is_unspecified6(ip6)) {
		__u32 src6[4] = { sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3] };

		unspecified6(ip6, !sending && is_v4_mapped(src6));
	} else if (is_v4_mapped(ip6) && !ip6[3]) {
		ip6[3] = unspecified4(sk->src_ip4);
	}
	/* An IPv4-mapped destination follows the IPv4 rules and listeners. */
	mapped = is_v4_mapped(ip6);
	endpoint_set_v6(&dst, ip6, port);
	if (!sending && protocol == CONNREDIR_PROTO_UDP && udp_take_flow(ctx, sk, &dst))
		return 1;
	if (sending && original_peer(sk, &dst))
		return 1;
	verdict = decide_traced(ctx, sk, &dst, !mapped, protocol, &target, &refusal);
	udp_list(ctx, verdict);
	if (verdict == VERDICT_REFUSE)
		return refuse(ctx, refusal);
	if (verdict != VERDICT_REDIRECT || !target)
		return 1;
	if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = *(const __u32 *)target->addr;
	} else {
		const __u32 *addr = (const __u32 *)target->addr;

		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	}
	ctx->user_port = target->port;
	return 1;
}

SEC("cgroup/connect4")
int connredir_connect4(struct bpf_sock_addr *ctx)
{
	return on_addr4(ctx, 0);
}

SEC("cgroup/connect6")
int connredir_connect6(struct bpf_sock_addr *ctx)
{
	return on_addr6(ctx, 0);
}

/*
 * An unconnected UDP socket's sendto()/sendmsg() with an address: each
 * datagram is decided as a connect would be. The socket's record is that of
 * the last selected destination it sent to (see lib/udp.h).
 */
SEC("cgroup/sendmsg4")
int connredir_sendmsg4(struct bpf_sock_addr *ctx)
{
	return on_addr4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int connredir_sendmsg6(struct bpf_sock_addr *ctx)
{
	return on_addr6(ctx, 1);
}
