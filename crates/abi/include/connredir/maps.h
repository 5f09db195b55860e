/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * connredir internals: the layouts of the layer's maps, their names, keys
 * and capacities, the per-socket state, the counters and the internal
 * flags. Only the kernel programs and the engine use these; proxies need
 * uapi.h alone (included here), and this file may change with the layer.
 *
 * Fixed-width types only, as in uapi.h. Byte order as in uapi.h unless a
 * comment says otherwise.
 */
#ifndef CONNREDIR_ABI_MAPS_H
#define CONNREDIR_ABI_MAPS_H

#include "uapi.h"

/* ---- The record seal. */

/* The key of the record seal (value of the one-entry seal_key array): 16
 * random bytes the engine writes once; all zero means none yet, and then
 * no record passes as sealed. */
struct connredir_seal_key {
	uint64_t k0;
	uint64_t k1;
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
/* A service asked SO_ORIGINAL_DST on this accepted socket: its record is in
 * the inherit map (inherit_tgid, inherit_seq), taken or not, until this
 * closes. */
#define CONNREDIR_SOCK_INHERIT_KEPT 16u
/* The socket was accepted on a service's address with its flow's record. */
#define CONNREDIR_SOCK_ACCEPTED 32u
/* A records-less service's onward socket took its record from the inherit
 * map (inherit_tgid, inherit_seq): if its connect fails, the record goes
 * back, for the service's next attempt (a retry on a new socket). */
#define CONNREDIR_SOCK_INHERITED 64u

struct connredir_sock_state {
	struct connredir_record record;
	uint32_t flags;
	/* The process that connected this socket, for the live-connection list. */
	uint32_t pid;
	uint32_t uid;
	/* With CONNREDIR_SOCK_ACCEL_ONWARD: the service that set the records. */
	uint32_t onward_service;
	uint64_t cgroup_id;
	uint8_t comm[16];
	/* With CONNREDIR_SOCK_CUT_COUNTED: the bytes its peer wrote into it
	 * (the acceleration state goes at TCP close, before the owner may
	 * have read it; the socket's own storage lasts until it is freed). */
	uint64_t cut_through_bytes;
	/* With CONNREDIR_SOCK_INHERIT_KEPT (an accepted socket) or
	 * CONNREDIR_SOCK_INHERITED (an onward one): the asking process and the
	 * record's place in its queue (see inherit). */
	uint32_t inherit_tgid;
	uint32_t inherit_seq;
};

/*
 * A socket whose flow's record is one hop, the hop that brought it here: a
 * client's socket once sockops handed its record on (TCP_CONNECT_CB), and
 * the socket a service accepted for it (PASSIVE_ESTABLISHED_CB; unless the
 * service accelerates: a socket it cuts through gets a state at close,
 * for its byte count, so it keeps the whole state from the start). Such a
 * record is fully known from this much (the rest of struct
 * connredir_record is the magic, this version, zero reserved fields and
 * empty hop slots), so these sockets keep it here, in the sock_hop socket
 * storage, instead of the whole struct connredir_sock_state: a fifth of
 * the memory per socket. The socket options answer from it as from a
 * whole record. A socket has one of the two, never both at once.
 */
struct connredir_sock_hop {
	/* CONNREDIR_SOCK_OWN_HOP (a client's own redirect, handed on), or
	 * CONNREDIR_SOCK_ACCEPTED with CONNREDIR_SOCK_INHERIT_KEPT. */
	uint32_t flags;
	/* The record's client (the process that opened the flow). */
	uint32_t client_pid;
	uint32_t client_uid;
	/* With CONNREDIR_SOCK_INHERIT_KEPT: the asking process and the record's
	 * place in its queue (see inherit). */
	uint32_t inherit_tgid;
	uint64_t client_cgroup_id;
	uint8_t client_comm[16];
	uint32_t inherit_seq;
	uint32_t reserved;
	/* The record's one hop. */
	struct connredir_hop hop;
};

/* ---- Services. */

#define CONNREDIR_MAX_SERVICES 64

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
 * Transparent (TPROXY-like): a socket the service accepted for a redirected
 * flow answers getsockname() with the flow's original destination instead
 * of the service's address, for proxies that read the destination there
 * (cgroup/getsockname4|6). Off by default: a proxy that compares its
 * accepted sockets' local address with the destination (to catch loops)
 * would otherwise take every flow for a loop.
 */
#define CONNREDIR_SERVICE_TRANSPARENT 64u

/*
 * Entry 0 of the one-entry transparent_count array (a uint32_t): how many
 * entries of the services array have CONNREDIR_SERVICE_TRANSPARENT. While
 * it is 0, cgroup/getsockname4|6 return before any lookup (every
 * getsockname() in the attached cgroups meets them). The engine never lets
 * it fall below the truth: it raises it before it writes a transparent
 * entry and lowers it after it clears one, and counts the array afresh
 * when it takes over pinned maps, before its programs are attached.
 */

/*
 * Value of the service_by_pid hash (key: the process id, tgid). A pid names
 * the service only while the process that had it when it was registered
 * lives: its start time tells it from a later process given the same pid,
 * in the kernel, also while no engine runs to remove the entry.
 */
struct connredir_pid_identity {
	uint32_t service_id;
	uint32_t reserved;
	/* When the process started, in clock ticks since boot
	 * (CONNREDIR_CLOCK_TICKS_PER_SEC), as field 22 of /proc/PID/stat. */
	uint64_t start_ticks;
};

/* USER_HZ: the unit of process start times in /proc/PID/stat. */
#define CONNREDIR_CLOCK_TICKS_PER_SEC 100

/* Value of the services array, indexed by service id (0 is never used). */
struct connredir_service {
	uint32_t flags;
	uint32_t context_len; /* 0: the default context (original addresses) */
	struct connredir_endpoint listen4;
	struct connredir_endpoint listen6;
	uint8_t context[CONNREDIR_MAX_CONTEXT];
};

/* ---- Rules. */

#define CONNREDIR_PROTO_TCP 6
/* UDP: connected sockets at connect(), unconnected ones at each sendto(). */
#define CONNREDIR_PROTO_UDP 17
/* One rule for both TCP and UDP (not an IP protocol number). */
#define CONNREDIR_PROTO_TCP_AND_UDP 255
/*
 * Rule entries that can apply to one destination prefix at once, after
 * merging (each port range of a rule is one entry). The connect program
 * judges at most this many per connect, so its cost does not grow with
 * the number of rules; user space refuses a rule set that exceeds it.
 */
#define CONNREDIR_MAX_RULES_PER_PREFIX 16
#define CONNREDIR_ANY_UID 0xffffffffu
/* connredir_rule.gid: any group. */
#define CONNREDIR_ANY_GID 0xffffffffu

/* What a rule does with the connects it matches (connredir_rule.action). */
enum connredir_action {
	/* To the rule's service (skipped when the service had the flow). */
	CONNREDIR_ACTION_REDIRECT = 0,
	/* The connect goes to its destination; no later rule is judged. */
	CONNREDIR_ACTION_PERMIT = 1,
	/* The connect fails with EACCES; no service sees the flow. */
	CONNREDIR_ACTION_BLOCK = 2,
};

/* connredir_rule.comm_len: the command name matches as a prefix (the low
 * bits are the length compared); without it, the whole name matches. */
#define CONNREDIR_COMM_PREFIX 0x80u
#define CONNREDIR_COMM_LEN_MASK 0x1fu

/*
 * Bytes of an executable's file name a rule names (connredir_exe_name). A
 * rule names a file name of at most this many bytes, compared whole: a
 * process whose executable's name is longer matches no rule that names one.
 */
#define CONNREDIR_EXE_LEN 32

/* connredir_rule.flags: the rule has an executable condition, whose name
 * is the rule_exes entry of its rule_id. */
#define CONNREDIR_RULE_EXE 0x1u

/*
 * Key of the rules LPM trie. data[0] is the generation (0 or 1), data[1] the
 * family tag (4 or 6), then the address; prefixlen counts 16 bits for the
 * two tags plus the prefix length. Connects read the generation named in
 * rules_active while user space writes the whole new rule set under the
 * other one, then flips rules_active: a change applies all at once.
 */
struct connredir_rule_key {
	uint32_t prefixlen;
	uint8_t data[18];
};

/*
 * One rule entry. Every condition is on the connecting process or the flow,
 * read in the kernel at connect time; a zero (or "any") field is no
 * condition.
 */
struct connredir_rule {
	uint32_t rule_id;
	uint32_t service_id; /* CONNREDIR_ACTION_REDIRECT only; else 0 */
	uint32_t uid; /* CONNREDIR_ANY_UID: any */
	uint32_t gid; /* CONNREDIR_ANY_GID: any (the process's real gid) */
	uint16_t port_min; /* destination, host order, inclusive */
	uint16_t port_max;
	/* The socket's local port, host order, inclusive (0-65535: any). A
	 * socket not bound before connect() has local port 0 here. */
	uint16_t local_port_min;
	uint16_t local_port_max;
	uint8_t protocol;
	uint8_t action; /* enum connredir_action */
	uint8_t comm_len; /* 0: any command; else bytes of comm compared, with
			   * CONNREDIR_COMM_PREFIX for a prefix match */
	/* With cgroup_id: the depth of that cgroup below the cgroup v2 root
	 * (the root is 0); the caller's ancestor at this depth must be it. */
	uint8_t cgroup_level;
	/* Only flows whose record already names this service (0: any flow). */
	uint16_t after;
	uint16_t flags; /* CONNREDIR_RULE_* */
	/* Only processes in this cgroup or below it (0: any). */
	uint64_t cgroup_id;
	/* The command name (as /proc/PID/comm), NUL padded. */
	uint8_t comm[16];
};

/*
 * The executable's file name a rule names (the last component of the path
 * the process was started from, symbolic links resolved: the name of
 * mm->exe_file's dentry), NUL padded; the rule_exes value, by rule id.
 * Kept out of connredir_rule so that the rule sets, one per prefix in the
 * trie, stay as small as they are: only rules that name an executable pay.
 * Rule ids are never reused within a pinned layer, and user space writes
 * a rule's name before the generation that holds the rule is flipped in.
 */
struct connredir_exe_name {
	uint8_t name[CONNREDIR_EXE_LEN];
};

/* Every rule whose prefix contains the key's prefix, in evaluation order. */
struct connredir_rule_set {
	uint32_t count;
	uint32_t reserved;
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
	uint64_t netns;
	uint8_t client_addr[16];
	uint8_t service_addr[16];
	uint16_t client_port;
	uint16_t service_port;
	uint32_t reserved; /* zero: keys are compared byte for byte */
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

/* Indices of the handoff_budget array (uint64_t values). */
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
	uint8_t addr[16];
	uint16_t port;
	uint16_t reserved;
};

/* ---- Records inherited by services that do not set them. */

/*
 * When a registered service's process learns a connection's original
 * destination through SO_ORIGINAL_DST (or the getsockname() of a transparent
 * service), the connection's record joins a queue: one per process and
 * destination, in the asking socket's network namespace. When that process
 * then connects to that destination without records (an unmodified
 * transparent proxy), the new socket takes one queued record, so the flow
 * keeps its chain and its client and cannot loop between services. It takes
 * the oldest that the connecting thread asked for among the first
 * CONNREDIR_INHERIT_SCAN places, or else the oldest of all. So an event-loop
 * proxy, which may ask for several flows before it connects any of them
 * onward, gets one record for each onward connection, in the order it asked;
 * a thread-per-connection proxy gets its own thread's.
 *
 * A taken entry stays, marked, until its accepted connection closes, so
 * asking again on that connection queues nothing twice. An entry not taken
 * when its accepted connection closes stays, orphaned, within reach of the
 * newest CONNREDIR_INHERIT_SCAN places: an event-loop proxy that connected
 * onward for this flow before an earlier one took the earlier flow's entry,
 * and the earlier flow's onward connect, still to come, takes this one.
 */
struct connredir_inherit_key {
	uint64_t netns; /* network namespace cookie of the asking socket */
	uint32_t tgid;
	uint32_t seq; /* place in the queue (inherit_queue); 0 there */
	struct connredir_endpoint dst;
};

struct connredir_inherit {
	/* The flow's record. Its `reserved` holds the asking process's start
	 * (the low 32 bits of its start time in clock ticks): only that
	 * process takes the record, not a later one given its pid. */
	struct connredir_record record;
	uint32_t tid; /* the thread that asked */
	uint32_t taken; /* CONNREDIR_INHERIT_WAITING ... _ORPHAN_TAKEN */
};

/* connredir_inherit.taken: waiting for an onward connect; taken by one;
 * waiting, its accepted connection closed; and taken after that. */
#define CONNREDIR_INHERIT_WAITING 0
#define CONNREDIR_INHERIT_TAKEN 1
#define CONNREDIR_INHERIT_ORPHANED 2
#define CONNREDIR_INHERIT_ORPHAN_TAKEN 3

/*
 * The queue of one process and destination (key: connredir_inherit_key with
 * seq 0): places head to tail - 1 of the inherit map may hold records not yet
 * taken. At most CONNREDIR_INHERIT_QUEUE_DEPTH places are kept open: a record
 * asked for that many questions ago is past reach (its onward connect, if it
 * ever comes, is decided as a new connection's).
 */
struct connredir_inherit_queue {
	uint32_t head; /* the oldest place that may hold a record not taken */
	uint32_t tail; /* the next place to fill */
};

/* ---- Who listens on a service's address (the listeners SK_STORAGE). */

/*
 * Set on a listening socket when a process of the service's identity binds
 * the service's address (or found by the engine on registration). Connects
 * are redirected only to a listener marked for that service; the service is
 * "down" otherwise, and its failure policy decides.
 */
struct connredir_listener {
	uint32_t service_id; /* 0: bound before any service claimed the address */
	uint32_t tgid; /* the process that bound it */
	uint32_t uid; /* its uid */
	/* When that process started: the low 32 bits of its start time in
	 * clock ticks since boot (CONNREDIR_CLOCK_TICKS_PER_SEC, field 22 of
	 * /proc/PID/stat). With tgid, it names the process, not only its pid,
	 * which a later process may be given once the binder exited. 0 in a
	 * mark an older layer made: no process matches it. */
	uint32_t start_ticks;
	uint64_t cgroup_id; /* its cgroup */
};

/* ---- Sockmap acceleration (the accel_socks sockhash and accel_state). */

/*
 * A socket in the acceleration maps: its network namespace's cookie and its
 * 4-tuple. Only the layer builds these (a caller never names a namespace):
 * sockets of different namespaces that share addresses are never joined.
 */
struct connredir_pair_key {
	uint64_t netns;
	struct connredir_sock_tuple tuple;
	uint32_t reserved; /* zero: keys are compared byte for byte */
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
	uint64_t arrived;
	/* While cut through: the socket whose receive queue gets them. */
	struct connredir_pair_key target;
	uint32_t flags; /* CONNREDIR_ACCEL_PASSED */
	/* The service whose proxy holds this socket (it accepted it on the
	 * service's address, or set records on it); 0 for others. */
	uint32_t owner;
};

/* ---- Live redirected connections (the conns hash, keyed by socket cookie). */

/*
 * One redirected socket: a leg of a flow, from its client or a service. A
 * TCP leg is listed from TCP_CONNECT_CB until the socket closes (sockops);
 * a UDP leg from the connect() or sendto() that redirected it until the
 * socket is released (cgroup/sock_release), or until a later decision of
 * the same socket sends it past every service.
 */
struct connredir_conn {
	uint64_t time_ns; /* CLOCK_BOOTTIME of the redirect */
	uint64_t cgroup_id; /* of the process that connected */
	uint32_t pid; /* tgid of the process that connected */
	uint32_t uid;
	uint8_t comm[16];
	uint32_t client_pid; /* the process that opened the flow */
	uint32_t client_uid;
	uint16_t hop_count; /* services in chain, this leg's included */
	/* CONNREDIR_PROTO_TCP or CONNREDIR_PROTO_UDP; 0 in an entry of a layer
	 * from before UDP flows were listed, which listed TCP only. */
	uint8_t protocol;
	uint8_t reserved;
	uint32_t chain[CONNREDIR_MAX_HOPS]; /* service ids, oldest first */
	/* The flow's first socket; for a UDP client's own leg, its bound
	 * address when it sent (zero when its connect() came before a bind). */
	struct connredir_endpoint client;
	struct connredir_endpoint local; /* this leg's socket (as `client`) */
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
	/* A permit rule decided: the flow goes direct, no later rule judged. */
	CONNREDIR_DECISION_PERMITTED = 8,
	/* A block rule decided: the connect (or datagram) fails with EACCES. */
	CONNREDIR_DECISION_BLOCKED = 9,
};

/* The flow's redirect state for the deciding rule's service (as WFP's). */
enum connredir_redirect_state {
	CONNREDIR_STATE_NOT_REDIRECTED = 0,
	CONNREDIR_STATE_BY_SELF = 1,
	CONNREDIR_STATE_BY_OTHER = 2,
	CONNREDIR_STATE_PREVIOUSLY_BY_SELF = 3,
};

struct connredir_trace_event {
	uint64_t time_ns; /* CLOCK_BOOTTIME */
	uint64_t cgroup_id;
	uint32_t pid;
	uint32_t uid;
	uint8_t comm[16];
	struct connredir_endpoint dst; /* the destination connect() asked for */
	uint32_t rule_id; /* 0: none */
	uint32_t service_id; /* 0: none */
	uint16_t hop_count; /* hops in the record before this decision */
	uint8_t decision; /* enum connredir_decision */
	uint8_t state; /* enum connredir_redirect_state */
	uint8_t protocol; /* CONNREDIR_PROTO_TCP or CONNREDIR_PROTO_UDP */
	uint8_t reserved[3];
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
	/* Connects (and datagrams) a permit rule sent direct. */
	CONNREDIR_CNT_PERMITTED = 22,
	/* Connects (and datagrams) a block rule refused. */
	CONNREDIR_CNT_BLOCKED = 23,
	CONNREDIR_CNT_MAX = 24,
};

/* ---- Map names, as the engine finds them in the object. */
#define CONNREDIR_MAP_SOCK_STATE "sock_state"
#define CONNREDIR_MAP_SOCK_HOP "sock_hop"
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
#define CONNREDIR_MAP_INHERIT_QUEUE "inherit_queue"
#define CONNREDIR_MAP_CONNS "conns"
#define CONNREDIR_MAP_TRACE "trace"
#define CONNREDIR_MAP_TRACE_CONTROL "trace_control"
#define CONNREDIR_MAP_ACCEL_SOCKS "accel_socks"
#define CONNREDIR_MAP_ACCEL_STATE "accel_state"
#define CONNREDIR_MAP_LISTENERS "listeners"
#define CONNREDIR_MAP_SEAL_KEY "seal_key"
#define CONNREDIR_MAP_RULE_EXES "rule_exes"
#define CONNREDIR_MAP_TRANSPARENT_COUNT "transparent_count"

/* Capacity of the maps whose size user space needs to know. */
#define CONNREDIR_MAX_RULE_PREFIXES 262144 /* both generations */
#define CONNREDIR_MAX_HANDOFFS 65536
#define CONNREDIR_MAX_IDENTITIES 1024
#define CONNREDIR_MAX_INHERITS 16384
/* Queues of inherited records: one per process and destination. */
#define CONNREDIR_MAX_INHERIT_QUEUES 16384
/* Places a queue keeps open, and places a records-less connect looks at. */
#define CONNREDIR_INHERIT_QUEUE_DEPTH 1024
#define CONNREDIR_INHERIT_SCAN 32
#define CONNREDIR_MAX_RULE_HITS 65536
/* Executable names of both generations' rules: a rule set may hold half. */
#define CONNREDIR_MAX_RULE_EXES 8192
#define CONNREDIR_MAX_CONNS 262144
#define CONNREDIR_TRACE_BYTES (256 * 1024)
#define CONNREDIR_MAX_ACCEL 131072

#endif /* CONNREDIR_ABI_MAPS_H */
