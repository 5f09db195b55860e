/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Addresses: endpoints of the ABI, IPv4 as IPv4-mapped IPv6, and the 4-tuple
 * of a socket as the sockops, sk_msg and sockopt contexts give it.
 */
#ifndef CONNREDIR_ADDR_H
#define CONNREDIR_ADDR_H

#include "common.h"

static __always_inline int is_v4_mapped(const __u32 ip6[4])
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

static __always_inline void endpoint_set_v4(struct connredir_endpoint *ep,
					    __u32 ip, __u16 port_be)
{
	__u32 *addr = (__u32 *)ep->addr;

	ep->family = AF_INET;
	ep->port = port_be;
	ep->scope_id = 0;
	addr[0] = ip;
	addr[1] = 0;
	addr[2] = 0;
	addr[3] = 0;
}

static __always_inline void endpoint_set_v6(struct connredir_endpoint *ep,
					    const __u32 ip6[4], __u16 port_be)
{
	__u32 *addr = (__u32 *)ep->addr;

	if (is_v4_mapped(ip6)) {
		endpoint_set_v4(ep, ip6[3], port_be);
		return;
	}
	ep->family = AF_INET6;
	ep->port = port_be;
	ep->scope_id = 0;
	addr[0] = ip6[0];
	addr[1] = ip6[1];
	addr[2] = ip6[2];
	addr[3] = ip6[3];
}

/* 127.0.0.1, in network order. */
#define LOOPBACK4 bpf_htonl(0x7f000001)

/*
 * The destination the kernel makes of an unspecified one, so that a rule on
 * a loopback address is not stepped around by connecting to 0.0.0.0 or ::
 * (route lookup and tcp_v6_connect/ip6_datagram_connect): IPv4 goes to the
 * socket's own source address (`src4`: the bound one, or a sendmsg's), else
 * to 127.0.0.1; IPv6 to ::1, or to ::ffff:127.0.0.1 when a connect's socket
 * is bound to an IPv4-mapped address (`to_mapped`). An IPv4-mapped
 * unspecified address is IPv4's.
 */
static __always_inline __u32 unspecified4(__u32 src4)
{
	return src4 ? src4 : LOOPBACK4;
}

static __always_inline int is_unspecified6(const __u32 ip6[4])
{
	return (ip6[0] | ip6[1] | ip6[2] | ip6[3]) == 0;
}

static __always_inline void unspecified6(__u32 ip6[4], int to_mapped)
{
	ip6[0] = 0;
	ip6[1] = 0;
	ip6[2] = to_mapped ? bpf_htonl(0xffff) : 0;
	ip6[3] = to_mapped ? LOOPBACK4 : bpf_htonl(1);
}

/* Writes an endpoint as a 16-byte IPv6 address, IPv4 as ::ffff:a.b.c.d. */
static __always_inline void endpoint_to_mapped(const struct connredir_endpoint *ep,
					       __u32 out[4])
{
	const __u32 *addr = (const __u32 *)ep->addr;

	if (ep->family == AF_INET) {
		out[0] = 0;
		out[1] = 0;
		out[2] = bpf_htonl(0xffff);
		out[3] = addr[0];
	} else {
		out[0] = addr[0];
		out[1] = addr[1];
		out[2] = addr[2];
		out[3] = addr[3];
	}
}

/* Writes an IPv4 endpoint as a sock_addr context's address and port (the
 * answer of getsockname, getpeername or recvmsg). */
static __always_inline void set_user_addr4(struct bpf_sock_addr *ctx,
					   const struct connredir_endpoint *ep)
{
	ctx->user_ip4 = *(const __u32 *)ep->addr;
	ctx->user_port = ep->port;
}

/* As set_user_addr4, into an IPv6 context (IPv4 as IPv4-mapped). */
static __always_inline void set_user_addr6(struct bpf_sock_addr *ctx,
					   const struct connredir_endpoint *ep)
{
	__u32 ip6[4];

	endpoint_to_mapped(ep, ip6);
	ctx->user_ip6[0] = ip6[0];
	ctx->user_ip6[1] = ip6[1];
	ctx->user_ip6[2] = ip6[2];
	ctx->user_ip6[3] = ip6[3];
	ctx->user_port = ep->port;
}

struct tuple {
	__u32 local[4];
	__u32 remote[4];
	__u16 local_port; /* host order */
	__u16 remote_port; /* host order */
};

/*
 * Reads a context's local and remote addresses into a tuple, IPv4 as
 * IPv4-mapped IPv6. Every field is read once, unconditionally and through
 * ctx_read (the verifier refuses computed context pointers). The field names
 * differ between context types (sock_ops and sk_msg_md: local_ip4 ...,
 * bpf_sock: src_ip4 ...), hence a macro.
 */
#define read_addrs(ctx, t, local4, remote4, local6, remote6)                             \
	do {                                                                               \
		__u32 family_ = ctx_read((ctx)->family);                                    \
		__u32 l4_ = ctx_read((ctx)->local4), r4_ = ctx_read((ctx)->remote4);        \
		__u32 l0_ = ctx_read((ctx)->local6[0]), l1_ = ctx_read((ctx)->local6[1]);   \
		__u32 l2_ = ctx_read((ctx)->local6[2]), l3_ = ctx_read((ctx)->local6[3]);   \
		__u32 r0_ = ctx_read((ctx)->remote6[0]), r1_ = ctx_read((ctx)->remote6[1]); \
		__u32 r2_ = ctx_read((ctx)->remote6[2]), r3_ = ctx_read((ctx)->remote6[3]); \
                                                                                           \
		if (family_ == AF_INET) {                                                  \
			l0_ = 0;                                                           \
			l1_ = 0;                                                           \
			l2_ = bpf_htonl(0xffff);                                           \
			l3_ = l4_;                                                         \
			r0_ = 0;                                                           \
			r1_ = 0;                                                           \
			r2_ = bpf_htonl(0xffff);                                           \
			r3_ = r4_;                                                         \
		}                                                                          \
		(t)->local[0] = l0_;                                                       \
		(t)->local[1] = l1_;                                                       \
		(t)->local[2] = l2_;                                                       \
		(t)->local[3] = l3_;                                                       \
		(t)->remote[0] = r0_;                                                      \
		(t)->remote[1] = r1_;                                                      \
		(t)->remote[2] = r2_;                                                      \
		(t)->remote[3] = r3_;                                                      \
	} while (0)

/* The 4-tuple of a sockops callback. */
static __always_inline void read_tuple(struct bpf_sock_ops *skops, struct tuple *t)
{
	__u32 remote_port = ctx_read(skops->remote_port);
	__u32 local_port = ctx_read(skops->local_port);

	read_addrs(skops, t, local_ip4, remote_ip4, local_ip6, remote_ip6);
	t->local_port = (__u16)local_port;
	/* remote_port holds the network-order port in its upper 16 bits. */
	t->remote_port = bpf_ntohs((__u16)(remote_port >> 16));
}

#endif /* CONNREDIR_ADDR_H */
