/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Every map of the layer. Their names are the CONNREDIR_MAP_* strings of
 * abi.h, their sizes its CONNREDIR_MAX_* constants.
 *
 * Each entry file includes this header and is compiled on its own, so each
 * object carries every definition; they are weak so that the linker
 * (bpftool gen object) merges the copies into one map per name instead of
 * refusing them as duplicates. The definitions are identical by
 * construction: the linker also checks that they match.
 */
#ifndef CONNREDIR_MAPS_H
#define CONNREDIR_MAPS_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connredir_sock_state);
} sock_state SEC(".maps") __weak;

/* A socket whose record is one hop keeps this instead (see abi.h). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connredir_sock_hop);
} sock_hop SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONNREDIR_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct connredir_service);
} services SEC(".maps") __weak;

/* Entry 0: how many services are transparent (see maps.h in the ABI). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} transparent_count SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u32);
	__type(value, struct connredir_pid_identity);
} service_by_pid SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u64);
	__type(value, __u32);
} service_by_cgroup SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_IDENTITIES);
	__type(key, __u32);
	__type(value, __u32);
} service_by_uid SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_SERVICES * 4);
	__type(key, struct connredir_addr_key);
	__type(value, __u32);
} service_addrs SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_RULE_PREFIXES);
	__type(key, struct connredir_rule_key);
	__type(value, struct connredir_rule_set);
} rules SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rules_active SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, CONNREDIR_MAX_RULE_HITS);
	__type(key, __u32);
	__type(value, __u64);
} rule_hits SEC(".maps") __weak;

/* The executable names of rules with CONNREDIR_RULE_EXE, by rule id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CONNREDIR_MAX_RULE_EXES);
	__type(key, __u32);
	__type(value, struct connredir_exe_name);
} rule_exes SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_HANDOFFS);
	__type(key, struct connredir_handoff_key);
	__type(value, struct connredir_record);
} handoff SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONNREDIR_MAX_INHERITS);
	__type(key, struct connredir_inherit_key);
	__type(value, struct connredir_inherit);
} inherit SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONNREDIR_MAX_INHERIT_QUEUES);
	__type(key, struct connredir_inherit_key);
	__type(value, struct connredir_inherit_queue);
} inherit_queue SEC(".maps") __weak;

/* One all-zero inherit entry, never written: what an entry kept for a
 * socket holding a one-hop record (sock_hop) is added from before it is
 * filled in place (inherit.h inherit_keep_hop): a whole record does not
 * fit on the stack. It holds no state, so the engine does not pin it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct connredir_inherit);
} inherit_blank SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connredir_listener);
} listeners SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_CONNS);
	__type(key, __u64); /* socket cookie */
	__type(value, struct connredir_conn);
} conns SEC(".maps") __weak;

/* One all-zero conns entry, never written: what a UDP leg's entry is added
 * from before it is filled in place (conns.h conns_entry). It holds no
 * state, so the engine does not pin it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct connredir_conn);
} conn_blank SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CONNREDIR_TRACE_BYTES);
} trace SEC(".maps") __weak;

/* Entry 0 is 1 while someone reads the trace: decisions are only sent then. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} trace_control SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, CONNREDIR_MAX_ACCEL);
	__type(key, struct connredir_pair_key);
	__type(value, __u32); /* a socket fd when user space updates it */
} accel_socks SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CONNREDIR_MAX_ACCEL);
	__type(key, struct connredir_pair_key);
	__type(value, struct connredir_accel_state);
} accel_state SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CONNREDIR_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps") __weak;

/* See CONNREDIR_MAX_FOREIGN_HANDOFFS in abi.h. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONNREDIR_BUDGET_MAX);
	__type(key, __u32);
	__type(value, __u64);
} handoff_budget SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct connredir_seal_key);
} seal_key SEC(".maps") __weak;

#endif /* CONNREDIR_MAPS_H */
