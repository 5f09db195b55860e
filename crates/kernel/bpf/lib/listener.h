/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Services are who they claim to be: a connect is redirected only to a
 * listener that the service's own process opened on the registered address.
 *
 * The bind programs (bind.c) mark a listening socket in the `listeners`
 * storage when a process of the service's identity binds the service's
 * address, and refuse that bind to anyone else in the scope; every other
 * bind in the scope notes who bound, for services registered later; the
 * engine marks listeners that existed before the layer saw their bind. At connect time
 * the redirect looks the listener up in the connecting socket's network
 * namespace (bpf_sk_lookup_tcp) and reads its mark: no mark for this service
 * means the service is down, whoever else may listen there.
 *
 * listener_state() is a global function: include this header from one entry
 * file only (through decide.h, connect.c).
 */
#ifndef CONNREDIR_LISTENER_H
#define CONNREDIR_LISTENER_H

#include "maps.h"
#include "service.h"

/* The state of a service's listener, seen from a connect. */
enum listener_state {
	LISTENER_ABSENT = 0, /* nothing of the service's own listens */
	LISTENER_OWN = 1, /* the service's own listener */
	LISTENER_CALLER = 2, /* ... opened by the connecting process itself */
};

/*
 * A listener bound before its service was registered carries only who bound
 * it (service_id 0): it is the service's when that process was of the
 * service's identity. The binder is fixed at bind time, so a process that
 * joins the identity later cannot bring in a listener of its own.
 */
static __always_inline int bound_by_identity(const struct connredir_listener *mark,
					     __u32 service_id)
{
	__u64 cgroup = mark->cgroup_id;
	__u32 tgid = mark->tgid, uid = mark->uid;
	__u32 *id;

	id = bpf_map_lookup_elem(&service_by_pid, &tgid);
	if (id && *id == service_id)
		return 1;
	id = bpf_map_lookup_elem(&service_by_cgroup, &cgroup);
	if (id && *id == service_id)
		return 1;
	id = bpf_map_lookup_elem(&service_by_uid, &uid);
	return id && *id == service_id;
}

/*
 * Whether the connecting process `tgid` is the one that bound the listener
 * `mark`: its pid and its start time. A listener outlives its binder when
 * the binder hands it on (a daemon that binds, forks and exits); a later
 * process given that pid is not the binder, and taken for it, it would be
 * let past the service as the service's own.
 */
static __always_inline int is_binder(const struct connredir_listener *mark, __u32 tgid)
{
	return mark->tgid == tgid && mark->start_ticks == (__u32)current_start_ticks();
}

/*
 * The state of `service_id`'s listener (IPv6 or IPv4; its UDP socket when
 * `udp`) for a connect by `tgid`. A global function: the verifier checks it once, apart from the
 * rule loop that calls it, whose states it would otherwise multiply.
 */
__noinline int listener_state(struct bpf_sock_addr *ctx, __u32 service_id, __u32 want_v6,
			      __u32 tgid, __u32 udp)
{
	struct bpf_sock_tuple tuple = {};
	struct connredir_service *service;
	struct connredir_listener *mark;
	struct bpf_sock *sk;
	int state = LISTENER_ABSENT;

	if (!ctx)
		return LISTENER_ABSENT;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service)
		return LISTENER_ABSENT;
	if (want_v6) {
		__builtin_memcpy(tuple.ipv6.daddr, service->listen6.addr, 16);
		tuple.ipv6.dport = service->listen6.port;
		if (udp)
			sk = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS,
					       0);
		else
			sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS,
					       0);
	} else {
		tuple.ipv4.daddr = *(const __u32 *)service->listen4.addr;
		tuple.ipv4.dport = service->listen4.port;
		if (udp)
			sk = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS,
					       0);
		else
			sk = bpf_sk_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS,
					       0);
	}
	if (!sk)
		return LISTENER_ABSENT;
	/* A UDP service's socket is bound, never listening; a lookup with no
	 * source finds only an unconnected one (its receiving socket). */
	if (udp || sk->state == TCP_LISTEN) {
		mark = bpf_sk_storage_get(&listeners, sk, 0, 0);
		if (mark && (mark->service_id == service_id ||
			     (mark->service_id == 0 && bound_by_identity(mark, service_id))))
			state = is_binder(mark, tgid) ? LISTENER_CALLER : LISTENER_OWN;
	}
	bpf_sk_release(sk);
	return state;
}

#endif /* CONNREDIR_LISTENER_H */
