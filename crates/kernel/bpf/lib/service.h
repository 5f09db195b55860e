/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Services and who they are: the services whose registered identity (pid
 * with its start time, cgroup, uid) is the calling process, and the service
 * registered at an address.
 */
#ifndef CONNREDIR_SERVICE_H
#define CONNREDIR_SERVICE_H

#include "maps.h"

/* What the layer reads of a task; the offsets come from the running
 * kernel's BTF when the object is loaded (CO-RE). `mm` is exe.h's way to
 * the executable. */
struct mm_struct;
struct task_struct {
	struct task_struct *group_leader;
	__u64 start_boottime;
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

/* When the current process started, in clock ticks since boot: what
 * /proc/PID/stat says of it (the thread group leader's start). */
static __always_inline __u64 current_start_ticks(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return task->group_leader->start_boottime /
	       (1000000000ull / CONNREDIR_CLOCK_TICKS_PER_SEC);
}

/* The service whose identity is cgroup `cgroup`, or 0. */
static __always_inline __u32 service_of_cgroup(__u64 cgroup)
{
	__u32 *id = bpf_map_lookup_elem(&service_by_cgroup, &cgroup);

	return id ? *id : 0;
}

/* The service whose identity is uid `uid`, or 0. */
static __always_inline __u32 service_of_uid(__u32 uid)
{
	__u32 *id = bpf_map_lookup_elem(&service_by_uid, &uid);

	return id ? *id : 0;
}

/*
 * The ids of the services whose registered identity is the current process:
 * by process, by cgroup and by uid (0 where none matches).
 */
struct caller_services {
	__u32 by_pid;
	__u32 by_cgroup;
	__u32 by_uid;
	__u32 uid;
};

static __always_inline void caller_services(struct caller_services *out)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 uid = (__u32)bpf_get_current_uid_gid();
	__u64 cgroup = bpf_get_current_cgroup_id();
	const struct connredir_pid_identity *by_pid;

	out->uid = uid;
	by_pid = bpf_map_lookup_elem(&service_by_pid, &tgid);
	/* A later process given a departed service process's pid is not it. */
	out->by_pid = by_pid && by_pid->start_ticks == current_start_ticks() ? by_pid->service_id
									       : 0;
	out->by_cgroup = service_of_cgroup(cgroup);
	out->by_uid = service_of_uid(uid);
}

static __always_inline int caller_is(const struct caller_services *caller,
				     __u32 service_id)
{
	return service_id != 0 &&
	       (caller->by_pid == service_id || caller->by_cgroup == service_id ||
		caller->by_uid == service_id);
}

/* The bit of `id` in a mask of services (0 for ids past the mask). */
static __always_inline __u64 service_bit(__u32 id)
{
	return id && id < CONNREDIR_MAX_SERVICES ? 1ull << id : 0;
}

/*
 * The services whose identity is the process that opened a flow, as its
 * record names it (its client), as a mask of service ids. A service counts
 * a flow its own process opened as its own (`own_connections_by_self`)
 * wherever the flow is in the chain, not only at that process's connect:
 * otherwise such a flow, once past a later service, would be sent back to
 * it. By cgroup and uid only: a record does not say when its client
 * started, so a process given a departed pid-identity process's pid could
 * pass for it here.
 */
static __always_inline __u64 opener_services(const struct connredir_record *record)
{
	return service_bit(service_of_cgroup(record->client_cgroup_id)) |
	       service_bit(service_of_uid(record->client_uid));
}

/* The service registered at `addr` (IPv4-mapped or IPv6):`port` (host
 * order), or 0. */
static __always_inline __u32 service_at(const __u32 addr[4], __u16 port)
{
	struct connredir_addr_key key = {};
	__u32 *id;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	id = bpf_map_lookup_elem(&service_addrs, &key);
	return id ? *id : 0;
}

/* The service whose address `addr` (IPv4-mapped or IPv6):`port` (host order)
 * covers, or 0. A wildcard address covers every service on that port. */
static __always_inline __u32 service_bound_at(const __u32 addr[4], __u16 port, int wildcard)
{
	__u32 id = service_at(addr, port);

	if (id || !wildcard)
		return id;
	for (__u32 i = 1; i < CONNREDIR_MAX_SERVICES; i++) {
		/* The loop counter stays in a register; the key is a copy. */
		__u32 key = i;
		struct connredir_service *service = bpf_map_lookup_elem(&services, &key);

		if (!service || !(service->flags & CONNREDIR_SERVICE_ACTIVE))
			continue;
		if (((service->flags & CONNREDIR_SERVICE_LISTEN4) &&
		     bpf_ntohs(service->listen4.port) == port) ||
		    ((service->flags & CONNREDIR_SERVICE_LISTEN6) &&
		     bpf_ntohs(service->listen6.port) == port))
			return i;
	}
	return 0;
}

#endif /* CONNREDIR_SERVICE_H */
