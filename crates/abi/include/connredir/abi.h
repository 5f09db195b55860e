/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The connredir ABI: the one definition of everything the kernel programs
 * and user space share. The record format, the map layouts, the map names,
 * the socket option numbers and the counter indices live here and nowhere
 * else; the Rust side is generated from this file by bindgen.
 *
 * Byte order: addresses and ports inside records are in network byte
 * order, as in a struct sockaddr; every other field is in host order.
 */
#ifndef CONNREDIR_ABI_H
#define CONNREDIR_ABI_H

#include <linux/types.h>

/* ---- Syscall-level interface: getsockopt/setsockopt on a private level. */

/* The private socket option level ("CNR" in ASCII). */
#define CONNREDIR_SOL 0x434e52
/* get: the connection's redirect records; set: hand records to a new socket. */
#define CONNREDIR_SO_RECORDS 1
/* get: the redirect context, for the service that redirected the flow. */
#define CONNREDIR_SO_CONTEXT 2
/*
 * get, on a listening socket: the id (__u32) of the service registered for
 * the socket's local address; ENOENT when none is, EINVAL when the socket
 * does not listen. Where the layer is not active the kernel answers
 * EOPNOTSUPP, as for every option of this level.
 */
#define CONNREDIR_SO_SERVICE 3

/*
 * get: a 4-byte 1 when the socket's peer is local and its data bypasses the
 * TCP stack (sockmap acceleration): read it with read()/recv(), not
 * splice(), which does not see that data. 0 otherwise.
 */
#define CONNREDIR_SO_ACCELERATED 4

/*
 * Cut-through, for a service whose flow is accelerated on both of its legs.
 * set, on the socket a direction reads from (struct connredir_cut_through):
 * from now on, what this socket's peer writes goes straight to the peer of
 * the caller's other socket named in `to`, without passing through the
 * caller. The caller has inspected the first bytes and wants the rest moved
 * by the kernel. `received` is how many bytes the caller has read from
 * this socket in all; it must have written them all to `to` first. When the
 * peer has written more than that (bytes in flight), the answer is EAGAIN:
 * read them, forward them, and ask again, so no byte overtakes another.
 * EOPNOTSUPP when one of the four sockets is not accelerated, EACCES when
 * the two sockets are not both the caller's service's, EALREADY when done.
 * After it, the socket only reads EOF (or an error) when the peer closes.
 * get: a 64-bit count of all bytes this socket's peer has written into it
 * socket to socket, read by the caller or, after the cut-through, moved
 * past it (for idle detection and byte counts). ENOENT when not
 * accelerated.
 */
#define CONNREDIR_SO_CUT_THROUGH 5

/* Linux transparent-proxy compatibility: answered from the record. */
#define CONNREDIR_SO_ORIGINAL_DST 80 /* SOL_IP, SO_ORIGINAL_DST */
#define CONNREDIR_IP6T_SO_ORIGINAL_DST 80 /* SOL_IPV6, IP6T_SO_ORIGINAL_DST */

/* ---- The redirect record. */

/* "CNRR", first field of every record blob. */
#define CONNREDIR_RECORD_MAGIC 0x52524e43u
/*
 * The version written by this layer; readers accept 1..=this. Version 2
 * appends client_comm; a version 1 blob ends before it (no command known).
 * Version 3 appends the seal: records belong to the layer.
 */
#define CONNREDIR_RECORD_VERSION 3
/* A flow is redirected at most this many times; past that it goes direct. */
#define CONNREDIR_MAX_HOPS 8

/* One endpoint: an IPv4 address sits in the first 4 bytes of addr. */
struct connredir_endpoint {
	__u16 family; /* AF_INET (2) or AF_INET6 (10); 0 when unknown */
	__u16 port; /* network byte order */
	__u32 scope_id;
	__u8 addr[16]; /* network byte order */
};

/* One redirect: which service took the flow, and where it was going. */
struct connredir_hop {
	__u32 service_id;
	__u32 reserved;
	__u64 time_ns; /* CLOCK_BOOTTIME when the redirect happened */
	struct connredir_endpoint original_dst; /* destination before the redirect */
	struct connredir_endpoint local; /* the redirected socket's own address */
};

/*
 * The redirect records of a connection: the chain of services that redirected
 * it so far, oldest first, and the process that opened the flow.
 * `size` is the number of bytes of the blob as written; a reader accepts any
 * size at least as large as version 1 and ignores what it does not know.
 */
struct connredir_record {
	__u32 magic;
	__u16 version;
	__u16 size;
	__u16 hop_count;
	__u16 flags;
	__u32 client_pid; /* tgid of the process that opened the flow */
	__u32 client_uid;
	__u32 reserved;
	__u64 client_cgroup_id;
	struct connredir_hop hops[CONNREDIR_MAX_HOPS];
	/* Version 2: the command name (comm) of the thread that opened the
	 * flow, NUL-padded; all zero when unknown. */
	__u8 client_comm[16];
	/*
	 * Version 3: SipHash-2-4, under the layer's secret key (the seal_key
	 * map), of every byte the layer reads: the header (the bytes before
	 * hops), the hop_count hops in use, then client_comm; unused hop slots
	 * are not covered, and the layer zeroes them when it takes a record.
	 * The layer computes it when it hands the records out
	 * (CONNREDIR_SO_RECORDS) and checks it when a service hands them back:
	 * a process that is not root may only set a record the layer issued
	 * whose last hop is its own service. Opaque: readers ignore it; a
	 * record built or changed by hand is unsealed.
	 */
	__u64 seal;
};

/* Size of a version 1 record: everything before client_comm. */
#define CONNREDIR_RECORD_V1_SIZE __builtin_offsetof(struct connredir_record, client_comm)
/* Size of a version 2 record: everything before the seal. */
#define CONNREDIR_RECORD_V2_SIZE __builtin_offsetof(struct connredir_record, seal)

/* The key of the record seal (value of the one-entry seal_key array): 16
 * random bytes the engine writes once; all zero means none yet, and then
 * no record passes as sealed. */
struct connredir_seal_key {
	__u64 k0;
	__u64 k1;
};

/* ---- Per-socket state held by the layer (SK_STORAGE value). */

/* The connect program redirected this socket; sockops hands the record on. */
#define CONNREDIR_SOCK_HANDOFF_PENDING 1u
/* An accelerated service set records on this (onward) socket. */
#define CONNREDIR_SOCK_ACCEL_ONWARD 2u
/* The socket closed while cut through: cut_through_bytes holds its count. */
#define CONNREDIR_SOCK_CUT_COUNTED 4u
/*
 * The record's last hop was appended by this socket's own connect(). A
 * connect hook runs before the connection exists, and the same socket may
 * connect again after a refused, failed or disconnected attempt: the next
 * connect() first takes that hop back, so every attempt is decided afresh.
 */
#define CONNREDIR_SOCK_OWN_HOP 8u
/* A service asked SO_ORIGINAL_DST on this accepted socket: its record waits
 * in the inherit map under inherit_key until used or until this closes. */
#define CONNREDIR_SOCK_INHERIT_KEPT 16u
/* The socket was accepted on a service's address with its flow's record. */
#define CONNREDIR_SOCK_ACCEPTED 32u

struct connredir_sock_state {
	struct connredir_record record;
	__u32 flags;
	/* The process that connected this socket, for the live-connection list. */
	__u32 pid;
	__u32 uid;
	/* With CONNREDIR_SOCK_ACCEL_ONWARD: the service that set the records. */
	__u32 onward_service;
	__u64 cgroup_id;
	__u8 comm[16];
	/* With CONNREDIR_SOCK_CUT_COUNTED: the bytes its peer wrote into it
	 * (the acceleration state goes at TCP close, before the owner may
	 * have read it; the socket's own storage lasts until it is freed). */
	__u64 cut_through_bytes;
	/* With CONNREDIR_SOCK_INHERIT_KEPT: the asking thread (see inherit). */
	__u32 inherit_tgid;
	__u32 inherit_tid;
};

/* ---- Services. */

#define CONNREDIR_MAX_SERVICES 64
#define CONNREDIR_MAX_CONTEXT 1024

#define CONNREDIR_SERVICE_ACTIVE 1u
#define CONNREDIR_SERVICE_LISTEN4 2u
#define CONNREDIR_SERVICE_LISTEN6 4u
/*
 * The service's own connections (its pid, cgroup or uid connecting without
 * records) count as redirected by self, so they never reach the service.
 * Without it, only the records decide, and a service that forwards with
 * records set can have its own other connections inspected by itself.
 */
#define CONNREDIR_SERVICE_OWN_BY_SELF 8u
/*
 * Sockmap acceleration: connections redirected to the service, and the
 * service's onward connections to a local destination, move their data
 * socket to socket without the TCP stack once both ends are known. The
 * service must read such sockets with read()/recv() (CONNREDIR_SO_ACCELERATED).
 */
#define CONNREDIR_SERVICE_ACCELERATE 16u
/*
 * Failure policy: while nothing of the service's own listens on its
 * address, skip the service (the flow goes on to the next matching rule or
 * direct) instead of refusing the connect. Without it (the default) such a
 * connect fails with ECONNREFUSED at once: a flow the rule selects is never
 * let past a service that is down.
 */
#define CONNREDIR_SERVICE_BYPASS_WHEN_DOWN 32u

/*
 * Value of the service_by_pid hash (key: the process id, tgid). A pid names
 * the service only while the process that had it when it was registered
 * lives: its start time tells it from a later process given the same pid,
 * in the kernel, also while no engine runs to remove the entry.
 */
struct connredir_pid_identity {
	__u32 service_id;
	__u32 reserved;
	/* When the process started, in clock ticks since boot
	 * (CONNREDIR_CLOCK_TICKS_PER_SEC), as field 22 of /proc/PID/stat. */
	__u64 start_ticks;
};

/* USER_HZ: the unit of process start times in /proc/PID/stat. */
#define CONNREDIR_CLOCK_TICKS_PER_SEC 100

/* Value of the services array, indexed by service id (0 is never used). */
struct connredir_service {
	__u32 flags;
	__u32 context_len; /* 0: the default context (original addresses) */
	struct connredir_endpoint listen4;
	struct connredir_endpoint listen6;
	__u8 context[CONNREDIR_MAX_CONTEXT];
};

/* The default redirect context: the original destination and local address. */
struct connredir_default_context {
	struct connredir_endpoint remote;
	struct connredir_endpoint local;
};

/* ---- Rules. */

#define CONNREDIR_PROTO_TCP 6
/* Rules that can match one destination at once (after prefix merging). */
#define CONNREDIR_MAX_RULES_PER_PREFIX 16
#define CONNREDIR_ANY_UID 0xffffffffu

/*
 * Key of the rules LPM trie. data[0] is the generation (0 or 1), data[1] the
 * family tag (4 or 6), then the address; prefixlen counts 16 bits for the
 * two tags plus the prefix length. Connects read the generation named in
 * rules_active while user space writes the whole new rule set under the
 * other one, then flips rules_active: a change applies all at once.
 */
struct connredir_rule_key {
	__u32 prefixlen;
	__u8 data[18];
};

struct connredir_rule {
	__u32 rule_id;
	__u32 service_id;
	__u32 uid; /* CONNREDIR_ANY_UID: any */
	__u16 port_min; /* host order, inclusive */
	__u16 port_max;
	__u8 protocol;
	__u8 reserved[3];
};

/* Every rule whose prefix contains the key's prefix, in evaluation order. */
struct connredir_rule_set {
	__u32 count;
	__u32 reserved;
	struct connredir_rule rules[CONNREDIR_MAX_RULES_PER_PREFIX];
};

/* ---- Hand-off of records from the connecting socket to the accepted one. */

/*
 * Addresses are IPv6 or IPv4-mapped IPv6; ports in host order. `netns` is
 * the network namespace's cookie (bpf_get_netns_cookie): the same 4-tuple
 * in another namespace is another connection, whose record never meets
 * this one's.
 */
struct connredir_handoff_key {
	__u64 netns;
	__u8 client_addr[16];
	__u8 service_addr[16];
	__u16 client_port;
	__u16 service_port;
	__u32 reserved; /* zero: keys are compared byte for byte */
};

/*
 * Hand-off entries that sockets of network namespaces other than the
 * layer's own may hold together. Any process of the scope can enter a
 * namespace of its own and keep redirected connections half-open there
 * (its own listener on the service's address never accepts them); without
 * a bound such entries could fill the map, and the host's own flows would
 * lose their records. Pending hand-offs last one handshake, so this is far
 * more than other namespaces (containers with a proxy of their own) need.
 */
#define CONNREDIR_MAX_FOREIGN_HANDOFFS 8192 /* an eighth of CONNREDIR_MAX_HANDOFFS */

/* Indices of the handoff_budget array (__u64 values). */
enum connredir_handoff_budget {
	/* The cookie of the network namespace the engine runs in, where its
	 * services listen; 0 until the engine writes it (then no bound). */
	CONNREDIR_BUDGET_HOME_NETNS = 0,
	/* Hand-off entries held now by sockets of other namespaces. */
	CONNREDIR_BUDGET_FOREIGN_HELD = 1,
	CONNREDIR_BUDGET_MAX = 2,
};

/* Key of the service_addrs hash: a listening endpoint, normalised as above. */
struct connredir_addr_key {
	__u8 addr[16];
	__u16 port;
	__u16 reserved;
};

/* ---- Records inherited by services that do not set them. */

/*
 * When a registered service's process learns a connection's original
 * destination through SO_ORIGINAL_DST, the connection's record is kept here,
 * once under the asking thread and once under its process (tid 0); if that
 * thread (or else that process) then connects to that destination without
 * records (an unmodified transparent proxy), the new socket takes the record,
 * so the flow keeps its chain and its client and cannot loop between
 * services. An entry is removed when used or when the accepted connection it
 * came from closes; a later question from the same thread replaces it.
 */
struct connredir_inherit_key {
	__u64 netns; /* network namespace cookie of the asking socket */
	__u32 tgid;
	__u32 tid; /* 0: any thread of tgid */
	struct connredir_endpoint dst;
};

struct connredir_inherit {
	struct connredir_record record;
	__u64 accepted; /* socket cookie of the accepted connection */
};

/* ---- Who listens on a service's address (the listeners SK_STORAGE). */

/*
 * Set on a listening socket when a process of the service's identity binds
 * the service's address (or found by the engine on registration). Connects
 * are redirected only to a listener marked for that service; the service is
 * "down" otherwise, and its failure policy decides.
 */
struct connredir_listener {
	__u32 service_id; /* 0: bound before any service claimed the address */
	__u32 tgid; /* the process that bound it */
	__u32 uid; /* its uid */
	__u32 reserved;
	__u64 cgroup_id; /* its cgroup */
};

/* ---- Sockmap acceleration (the accel_socks sockhash and accel_state). */

/* A socket's own view of its 4-tuple: IPv4 as IPv4-mapped, host-order ports. */
struct connredir_sock_tuple {
	__u8 local_addr[16];
	__u8 remote_addr[16];
	__u16 local_port;
	__u16 remote_port;
};

/*
 * A socket in the acceleration maps: its network namespace's cookie and its
 * 4-tuple. Only the layer builds these (a caller never names a namespace):
 * sockets of different namespaces that share addresses are never joined.
 */
struct connredir_pair_key {
	__u64 netns;
	struct connredir_sock_tuple tuple;
	__u32 reserved; /* zero: keys are compared byte for byte */
};

/* The socket sent data through TCP before its peer joined: it stays on TCP,
 * so its data cannot overtake what is already queued. */
#define CONNREDIR_ACCEL_PASSED 1u

/* In connredir_accel_state.arrived: what the peer writes is cut through. */
#define CONNREDIR_ACCEL_CUT_THROUGH (1ull << 63)

/* One joined socket (the accel_state value). */
struct connredir_accel_state {
	/* Bytes the peer wrote into this socket, socket to socket, counted as
	 * they move; the top bit (CONNREDIR_ACCEL_CUT_THROUGH) is set, in one
	 * atomic step with the count, once they go to `target` instead. */
	__u64 arrived;
	/* While cut through: the socket whose receive queue gets them. */
	struct connredir_pair_key target;
	__u32 flags; /* CONNREDIR_ACCEL_PASSED */
	/* The service whose proxy holds this socket (it accepted it on the
	 * service's address, or set records on it); 0 for others. */
	__u32 owner;
};

/* The CONNREDIR_SO_CUT_THROUGH request. */
struct connredir_cut_through {
	/* Bytes the caller has read from the socket, in all. */
	__u64 received;
	/* The caller's socket to send to, by its own 4-tuple; the layer looks
	 * it up in the namespace of the socket the option is set on. */
	struct connredir_sock_tuple to;
	__u32 reserved;
};

/* ---- Live redirected connections (the conns hash, keyed by socket cookie). */

/* One redirected socket: a leg of a flow, from its client or a service. */
struct connredir_conn {
	__u64 time_ns; /* CLOCK_BOOTTIME of the redirect */
	__u64 cgroup_id; /* of the process that connected */
	__u32 pid; /* tgid of the process that connected */
	__u32 uid;
	__u8 comm[16];
	__u32 client_pid; /* the process that opened the flow */
	__u32 client_uid;
	__u16 hop_count; /* services in chain, this leg's included */
	__u16 reserved;
	__u32 chain[CONNREDIR_MAX_HOPS]; /* service ids, oldest first */
	struct connredir_endpoint client; /* the flow's first socket */
	struct connredir_endpoint local; /* this leg's socket */
	struct connredir_endpoint original_dst;
};

/* ---- Trace of redirect decisions (ring buffer, while trace_control is 1). */

/* What the connect program decided. */
enum connredir_decision {
	CONNREDIR_DECISION_REDIRECTED = 1,
	/* No rule covers the destination, port, protocol and uid. */
	CONNREDIR_DECISION_NO_RULE = 2,
	/* Every matching rule's service already had the flow (or opened it). */
	CONNREDIR_DECISION_LOOP_PREVENTED = 3,
	/* The record is full (CONNREDIR_MAX_HOPS): the flow goes direct. */
	CONNREDIR_DECISION_HOP_LIMIT = 4,
	/* The socket storage could not be allocated: the connect is refused. */
	CONNREDIR_DECISION_NO_MEMORY = 5,
	/* The service's own listener is absent; on_down = block: refused. */
	CONNREDIR_DECISION_SERVICE_DOWN = 6,
	/* The service's own listener is absent; on_down = bypass: skipped, and
	 * no later rule took the flow. */
	CONNREDIR_DECISION_SERVICE_DOWN_BYPASSED = 7,
};

/* The flow's redirect state for the deciding rule's service (as WFP's). */
enum connredir_redirect_state {
	CONNREDIR_STATE_NOT_REDIRECTED = 0,
	CONNREDIR_STATE_BY_SELF = 1,
	CONNREDIR_STATE_BY_OTHER = 2,
	CONNREDIR_STATE_PREVIOUSLY_BY_SELF = 3,
};

struct connredir_trace_event {
	__u64 time_ns; /* CLOCK_BOOTTIME */
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__u8 comm[16];
	struct connredir_endpoint dst; /* the destination connect() asked for */
	__u32 rule_id; /* 0: none */
	__u32 service_id; /* 0: none */
	__u16 hop_count; /* hops in the record before this decision */
	__u8 decision; /* enum connredir_decision */
	__u8 state; /* enum connredir_redirect_state */
	__u32 reserved;
};

/* ---- Counters (indices of the per-CPU counters array). */

enum connredir_counter {
	CONNREDIR_CNT_REDIRECTS = 0,
	CONNREDIR_CNT_LOOPS_PREVENTED = 1,
	CONNREDIR_CNT_HOP_LIMIT = 2,
	CONNREDIR_CNT_HANDOFFS = 3,
	CONNREDIR_CNT_HANDOFF_MISSES = 4,
	CONNREDIR_CNT_DENIED_SETS = 5,
	CONNREDIR_CNT_RECORDS_SET = 6,
	CONNREDIR_CNT_ORIGINAL_DST_ANSWERED = 7,
	CONNREDIR_CNT_RECORDS_INHERITED = 8,
	CONNREDIR_CNT_CONNS_UNTRACKED = 9, /* the conns map was full */
	CONNREDIR_CNT_TRACE_LOST = 10, /* the trace ring buffer was full */
	CONNREDIR_CNT_ACCEL_JOINED = 11, /* sockets that joined the acceleration */
	CONNREDIR_CNT_ACCEL_PASSED = 12, /* joined sockets that stayed on TCP */
	CONNREDIR_CNT_ACCEL_SENDS = 13, /* writes moved socket to socket */
	CONNREDIR_CNT_CUT_THROUGHS = 14, /* directions handed to the kernel */
	CONNREDIR_CNT_CUT_THROUGH_SENDS = 15, /* writes moved past the service */
	/* Selected connects refused because their record could not be written. */
	CONNREDIR_CNT_FAILED_CLOSED = 16,
	/* Selected connects refused: the service's own listener was absent. */
	CONNREDIR_CNT_SERVICE_DOWN_BLOCKED = 17,
	/* Services skipped (on_down = bypass) while their listener was absent. */
	CONNREDIR_CNT_SERVICE_DOWN_BYPASSED = 18,
	/* Binds of a service's address by a process that is not the service. */
	CONNREDIR_CNT_BINDS_REFUSED = 19,
	/* A service's listening process connecting where its own rule would
	 * send it back to itself: treated as its own flow, not redirected. */
	CONNREDIR_CNT_SELF_LOOPS = 20,
	/* Sets refused to a service: a record the layer did not issue, or not
	 * the caller's (its last hop is another service's). */
	CONNREDIR_CNT_FORGED_RECORDS = 21,
	CONNREDIR_CNT_MAX = 22,
};

/* ---- Map names, as the engine finds them in the object. */
#define CONNREDIR_MAP_SOCK_STATE "sock_state"
#define CONNREDIR_MAP_SERVICES "services"
#define CONNREDIR_MAP_SERVICE_BY_PID "service_by_pid"
#define CONNREDIR_MAP_SERVICE_BY_CGROUP "service_by_cgroup"
#define CONNREDIR_MAP_SERVICE_BY_UID "service_by_uid"
#define CONNREDIR_MAP_SERVICE_ADDRS "service_addrs"
#define CONNREDIR_MAP_RULES "rules"
#define CONNREDIR_MAP_RULES_ACTIVE "rules_active"
#define CONNREDIR_MAP_RULE_HITS "rule_hits"
#define CONNREDIR_MAP_HANDOFF "handoff"
#define CONNREDIR_MAP_HANDOFF_BUDGET "handoff_budget"
#define CONNREDIR_MAP_COUNTERS "counters"
#define CONNREDIR_MAP_INHERIT "inherit"
#define CONNREDIR_MAP_CONNS "conns"
#define CONNREDIR_MAP_TRACE "trace"
#define CONNREDIR_MAP_TRACE_CONTROL "trace_control"
#define CONNREDIR_MAP_ACCEL_SOCKS "accel_socks"
#define CONNREDIR_MAP_ACCEL_STATE "accel_state"
#define CONNREDIR_MAP_LISTENERS "listeners"
#define CONNREDIR_MAP_SEAL_KEY "seal_key"

/* Capacity of the maps whose size user space needs to know. */
#define CONNREDIR_MAX_RULE_PREFIXES 262144 /* both generations */
#define CONNREDIR_MAX_HANDOFFS 65536
#define CONNREDIR_MAX_IDENTITIES 1024
#define CONNREDIR_MAX_INHERITS 16384
#define CONNREDIR_MAX_RULE_HITS 65536
#define CONNREDIR_MAX_CONNS 262144
#define CONNREDIR_TRACE_BYTES (256 * 1024)
#define CONNREDIR_MAX_ACCEL 131072

#endif /* CONNREDIR_ABI_H */
