/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cgroup/connect4 and cgroup/connect6: every TCP connect() in the attached
 * cgroups. The destination is read from the context, decided by decide()
 * (lib/decide.h: the rules, the chain, the service's listener) and, when
 * redirected, rewritten to the service's listening address.
 */
#include "lib/addr.h"
#include "lib/decide.h"

/* A refused connect: the errno reaches the caller of connect(). */
static __always_inline int refuse(int err)
{
	bpf_set_retval(err);
	return 0;
}

SEC("cgroup/connect4")
int connredir_connect4(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *target = NULL;
	struct connredir_endpoint dst;
	int verdict, refusal = 0;

	if (type != SOCK_STREAM || !sk)
		return 1;
	endpoint_set_v4(&dst, ip, port);
	verdict = decide_traced(ctx, sk, &dst, 0, &target, &refusal);
	if (verdict == VERDICT_REFUSE)
		return refuse(refusal);
	if (verdict == VERDICT_REDIRECT && target) {
		ctx->user_ip4 = *(const __u32 *)target->addr;
		ctx->user_port = target->port;
	}
	return 1;
}

SEC("cgroup/connect6")
int connredir_connect6(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip6[4];
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *target = NULL;
	struct connredir_endpoint dst;
	int mapped, verdict, refusal = 0;

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (type != SOCK_STREAM || !sk)
		return 1;
	/* An IPv4-mapped destination follows the IPv4 rules and listeners. */
	mapped = is_v4_mapped(ip6);
	endpoint_set_v6(&dst, ip6, port);
	verdict = decide_traced(ctx, sk, &dst, !mapped, &target, &refusal);
	if (verdict == VERDICT_REFUSE)
		return refuse(refusal);
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
