/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cgroup/bind4 and cgroup/bind6: a service's address belongs to the service.
 *
 * A TCP or UDP bind of a registered service address (or of a wildcard address on a
 * service's port, which would receive its connections too) by a process of
 * the service's identity marks the socket as the service's listener (see
 * lib/listener.h); any other bind notes who bound, so that a service
 * registered after its proxy bound still finds its listener its own. Root
 * may bind it too (unmarked: it receives no redirected flow). Anyone else
 * in the scope is refused with EACCES, so no client can stand in for a
 * service while it restarts, nor join its SO_REUSEPORT group.
 */
#include "lib/addr.h"
#include "lib/maps.h"
#include "lib/service.h"
#include "lib/trace.h"

static __always_inline int on_bind(struct bpf_sock_addr *ctx, const __u32 addr[4], __u16 port_be,
				   int wildcard)
{
	struct connredir_listener *mark;
	struct caller_services caller;
	__u32 service_id;

	service_id = service_bound_at(addr, bpf_ntohs(port_be), wildcard);
	caller_services(&caller);
	if (!service_id || caller_is(&caller, service_id)) {
		/* Who bound it, for this service or one registered later
		 * (lib/listener.h); a full option memory only loses the mark. */
		mark = bpf_sk_storage_get(&listeners, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (mark) {
			mark->service_id = service_id;
			mark->tgid = bpf_get_current_pid_tgid() >> 32;
			mark->start_ticks = (__u32)current_start_ticks();
			mark->uid = caller.uid;
			mark->cgroup_id = bpf_get_current_cgroup_id();
		}
		return 1;
	}
	if (caller.uid == 0)
		return 1;
	count(CONNREDIR_CNT_BINDS_REFUSED);
	bpf_set_retval(-EACCES);
	return 0;
}

SEC("cgroup/bind4")
int connredir_bind4(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	__u32 addr[4] = { 0, 0, bpf_htonl(0xffff), ip };

	if ((type != SOCK_STREAM && type != SOCK_DGRAM) || !port || !ctx->sk)
		return 1;
	return on_bind(ctx, addr, port, ip == 0);
}

SEC("cgroup/bind6")
int connredir_bind6(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u16 port = (__u16)ctx->user_port;
	__u32 addr[4];

	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	if ((type != SOCK_STREAM && type != SOCK_DGRAM) || !port || !ctx->sk)
		return 1;
	return on_bind(ctx, addr, port,
		       (addr[0] | addr[1] | addr[2] | addr[3]) == 0 ||
			       (is_v4_mapped(addr) && addr[3] == 0));
}
