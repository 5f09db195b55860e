/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* Maps, constants and small helpers shared by every connredir program. */
#ifndef CONNREDIR_COMMON_H
#define CONNREDIR_COMMON_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <connredir/abi.h>

/* From <sys/socket.h> and <netinet/tcp.h>, which are not usable here. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SOL_IPV6 41

enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_CLOSE = 7,
	TCP_LISTEN = 10,
	TCP_NEW_SYN_RECV = 12,
};

/* ---- Maps: their names are the CONNREDIR_MAP_* strings of abi.h. */

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connredir_sock_state);
} sock_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONNREDIR_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct connredir_service);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u32);
	__type(value, struct connredir_pid_identity);
} service_by_pid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u64);
	__type(value, __u32);
} service_by_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u32);
	__type(value, __u32);
} service_by_uid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_SERVICES * 4);
	__type(key, struct connredir_addr_key);
	__type(value, __u32);
} service_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_RULE_PREFIXES);
	__type(key, struct connredir_rule_key);
	__type(value, struct connredir_rule_set);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rules_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, CONNREDIR_MAX_RULE_HITS);
	__type(key, __u32);
	__type(value, __u64);
} rule_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_HANDOFFS);
	__type(key, struct connredir_handoff_key);
	__type(value, struct connredir_record);
} handoff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONNREDIR_MAX_INHERITS);
	__type(key, struct connredir_inherit_key);
	__type(value, struct connredir_inherit);
} inherit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connredir_listener);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_CONNS);
	__type(key, __u64); /* socket cookie */
	__type(value, struct connredir_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CONNREDIR_TRACE_BYTES);
} trace SEC(".maps");

/* Entry 0 is 1 while someone reads the trace: decisions are only sent then. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} trace_control SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, CONNREDIR_MAX_ACCEL);
	__type(key, struct connredir_pair_key);
	__type(value, __u32); /* a socket fd when user space updates it */
} accel_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_ACCEL);
	__type(key, struct connredir_pair_key);
	__type(value, struct connredir_accel_state);
} accel_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CONNREDIR_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* ---- Helpers. */

/*
 * A ctx field read the compiler must keep as one fixed-offset load: left to
 * itself, clang may turn `cond ? ctx->a : ctx->b` into a load through a
 * computed ctx pointer, which the verifier rejects.
 */
#define ctx_read(field) (*(volatile typeof(field) *)&(field))

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &counter);

	if (value)
		*value += 1;
}

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

/* What the layer reads of a task; the offsets come from the running
 * kernel's BTF when the object is loaded (CO-RE). */
struct task_struct {
	struct task_struct *group_leader;
	__u64 start_boottime;
} __attribute__((preserve_access_index));

/* When the current process started, in clock ticks since boot: what
 * /proc/PID/stat says of it (the thread group leader's start). */
static __always_inline __u64 current_start_ticks(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return task->group_leader->start_boottime /
	       (1000000000ull / CONNREDIR_CLOCK_TICKS_PER_SEC);
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
	__u32 *id;

	out->uid = uid;
	by_pid = bpf_map_lookup_elem(&service_by_pid, &tgid);
	/* A later process given a departed service process's pid is not it. */
	out->by_pid = by_pid && by_pid->start_ticks == current_start_ticks() ? by_pid->service_id
									       : 0;
	id = bpf_map_lookup_elem(&service_by_cgroup, &cgroup);
	out->by_cgroup = id ? *id : 0;
	id = bpf_map_lookup_elem(&service_by_uid, &uid);
	out->by_uid = id ? *id : 0;
}

static __always_inline int caller_is(const struct caller_services *caller,
				     __u32 service_id)
{
	return service_id != 0 &&
	       (caller->by_pid == service_id || caller->by_cgroup == service_id ||
		caller->by_uid == service_id);
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

static __always_inline __u32 clamp_hops(__u32 hop_count)
{
	return hop_count > CONNREDIR_MAX_HOPS ? CONNREDIR_MAX_HOPS : hop_count;
}

/* ---- The 4-tuple of a sockops callback. */

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

#endif /* CONNREDIR_COMMON_H */
