/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The redirect layer: where a redirect is decided.
 *
 * cgroup/connect4 and cgroup/connect6 see every TCP connect() in the cgroups
 * they are attached to. The rules that match the destination come from one
 * LPM-trie lookup (user space merges every rule whose prefix covers a longer
 * one into the longer prefix's set, already in evaluation order). A rule is
 * skipped when its service already handled this flow (its id is in the
 * socket's redirect record) or, unless the service says otherwise, when the
 * connecting process is the service itself; the first remaining rule wins: the destination becomes the
 * service's listening address and a hop is appended to the record.
 */
#include "common.h"

/* The flow's redirect state for `service_id`, from its record (see abi.h). */
static __always_inline __u8 chain_state(const struct connredir_record *record,
					__u32 hop_count, __u32 service_id)
{
	__u8 state = hop_count ? CONNREDIR_STATE_BY_OTHER : CONNREDIR_STATE_NOT_REDIRECTED;

	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++) {
		if (i >= hop_count)
			break;
		if (record->hops[i].service_id == service_id)
			state = i + 1 == hop_count ? CONNREDIR_STATE_BY_SELF
						   : CONNREDIR_STATE_PREVIOUSLY_BY_SELF;
	}
	return state;
}

/* The generation of the rules that connects read now (see abi.h). */
static __always_inline __u8 rules_generation(void)
{
	__u32 zero = 0;
	__u32 *active = bpf_map_lookup_elem(&rules_active, &zero);

	return active && *active ? 1 : 0;
}

/* Counts a rule's redirect. */
static __always_inline void count_hit(__u32 rule_id)
{
	__u64 one = 1, *hits = bpf_map_lookup_elem(&rule_hits, &rule_id);

	if (hits)
		*hits += 1;
	else
		bpf_map_update_elem(&rule_hits, &rule_id, &one, BPF_NOEXIST);
}

/* Looks for a record kept for `service_id`'s connection to `dst`. */
static __always_inline struct connredir_record *
kept_record(__u32 service_id, const struct connredir_endpoint *dst,
	    struct connredir_inherit_key *key)
{
	if (!service_id)
		return NULL;
	key->service_id = service_id;
	key->dst = *dst;
	return bpf_map_lookup_elem(&inherit, key);
}

/*
 * A service's process connecting without records: if it just asked where an
 * accepted connection was going (SO_ORIGINAL_DST) and now connects there,
 * this socket carries that connection's record (see abi.h, inherit).
 */
static __always_inline struct connredir_sock_state *
inherit_record(struct bpf_sock *sk, const struct caller_services *caller,
	       const struct connredir_endpoint *dst)
{
	struct connredir_inherit_key key = {};
	struct connredir_sock_state *state;
	struct connredir_record *kept;

	kept = kept_record(caller->by_pid, dst, &key);
	if (!kept)
		kept = kept_record(caller->by_cgroup, dst, &key);
	if (!kept)
		kept = kept_record(caller->by_uid, dst, &key);
	if (!kept)
		return NULL;
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (state) {
		state->record = *kept;
		state->flags = 0;
		count(CONNREDIR_CNT_RECORDS_INHERITED);
	}
	bpf_map_delete_elem(&inherit, &key);
	return state;
}

/* Is someone reading the trace? */
static __always_inline int tracing(void)
{
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&trace_control, &zero);

	return on && *on;
}

/* Sends a decision to the trace ring buffer, with the calling process. */
static __always_inline void emit(const struct connredir_trace_event *ev)
{
	struct connredir_trace_event *out;
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	out = bpf_ringbuf_reserve(&trace, sizeof(*out), 0);
	if (!out) {
		count(CONNREDIR_CNT_TRACE_LOST);
		return;
	}
	*out = *ev;
	out->time_ns = bpf_ktime_get_boot_ns();
	out->cgroup_id = bpf_get_current_cgroup_id();
	out->pid = pid_tgid >> 32;
	out->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(out->comm, sizeof(out->comm));
	bpf_ringbuf_submit(out, 0);
}

/* Notes who connected, for the live-connection list (see handoff.c). */
static __always_inline void note_connecting_process(struct connredir_sock_state *state,
						    __u32 uid)
{
	state->pid = bpf_get_current_pid_tgid() >> 32;
	state->uid = uid;
	state->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(state->comm, sizeof(state->comm));
}

/*
 * Decides the fate of a connect to `dst`. Returns the service's listening
 * endpoint to connect to instead, or NULL to leave the connection alone;
 * `ev` gets the decision, the rule, the service and the redirect state.
 * `want_v6` asks for the service's IPv6 listener (native IPv6 destination).
 */
static __always_inline const struct connredir_endpoint *
decide(struct bpf_sock *sk, const struct connredir_endpoint *dst, int want_v6,
       struct connredir_trace_event *ev)
{
	struct connredir_rule_key key = {};
	struct connredir_rule_set *set;
	struct connredir_sock_state *state;
	struct caller_services caller;
	__u32 hop_count = 0, count_rules;
	__u16 port = bpf_ntohs(dst->port);
	int skipped = 0;

	ev->decision = CONNREDIR_DECISION_NO_RULE;
	key.data[0] = rules_generation();
	key.data[1] = want_v6 ? 6 : 4;
	key.prefixlen = 16 + (want_v6 ? 128 : 32);
	__builtin_memcpy(&key.data[2], dst->addr, 16);
	set = bpf_map_lookup_elem(&rules, &key);
	if (!set)
		return NULL;

	caller_services(&caller);
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		state = inherit_record(sk, &caller, dst);
	if (state)
		hop_count = clamp_hops(state->record.hop_count);
	ev->hop_count = hop_count;

	count_rules = set->count;
	for (__u32 i = 0; i < CONNREDIR_MAX_RULES_PER_PREFIX; i++) {
		const struct connredir_rule *rule;
		struct connredir_service *service;
		struct connredir_hop *hop;
		__u32 service_id;
		__u8 flow_state;

		if (i >= count_rules)
			break;
		rule = &set->rules[i];
		if (rule->protocol != CONNREDIR_PROTO_TCP || port < rule->port_min ||
		    port > rule->port_max)
			continue;
		if (rule->uid != CONNREDIR_ANY_UID && rule->uid != caller.uid)
			continue;
		service_id = rule->service_id;
		service = bpf_map_lookup_elem(&services, &service_id);
		if (!service || !(service->flags & CONNREDIR_SERVICE_ACTIVE))
			continue;
		if (!(service->flags & (want_v6 ? CONNREDIR_SERVICE_LISTEN6
						: CONNREDIR_SERVICE_LISTEN4)))
			continue;

		/* A service never takes a flow it handled (or, if it says so, opened). */
		flow_state = state ? chain_state(&state->record, hop_count, service_id)
				   : CONNREDIR_STATE_NOT_REDIRECTED;
		if ((service->flags & CONNREDIR_SERVICE_OWN_BY_SELF) &&
		    caller_is(&caller, service_id) &&
		    (flow_state == CONNREDIR_STATE_NOT_REDIRECTED ||
		     flow_state == CONNREDIR_STATE_BY_OTHER))
			flow_state = CONNREDIR_STATE_BY_SELF;
		if (flow_state == CONNREDIR_STATE_BY_SELF ||
		    flow_state == CONNREDIR_STATE_PREVIOUSLY_BY_SELF) {
			if (!skipped) {
				ev->decision = CONNREDIR_DECISION_LOOP_PREVENTED;
				ev->rule_id = rule->rule_id;
				ev->service_id = service_id;
				ev->state = flow_state;
			}
			skipped = 1;
			continue;
		}

		if (skipped)
			count(CONNREDIR_CNT_LOOPS_PREVENTED);
		ev->rule_id = rule->rule_id;
		ev->service_id = service_id;
		ev->state = flow_state;
		if (hop_count >= CONNREDIR_MAX_HOPS) {
			ev->decision = CONNREDIR_DECISION_HOP_LIMIT;
			count(CONNREDIR_CNT_HOP_LIMIT);
			return NULL;
		}
		if (!state) {
			state = bpf_sk_storage_get(&sock_state, sk, 0,
						   BPF_SK_STORAGE_GET_F_CREATE);
			if (!state) {
				ev->decision = CONNREDIR_DECISION_NO_MEMORY;
				return NULL;
			}
		}
		if (hop_count == 0) {
			/* First redirect: this process opened the flow. */
			state->record.magic = CONNREDIR_RECORD_MAGIC;
			state->record.version = CONNREDIR_RECORD_VERSION;
			state->record.size = sizeof(struct connredir_record);
			state->record.client_pid = bpf_get_current_pid_tgid() >> 32;
			state->record.client_uid = caller.uid;
			state->record.client_cgroup_id = bpf_get_current_cgroup_id();
			bpf_get_current_comm(state->record.client_comm,
					     sizeof(state->record.client_comm));
		}
		hop = &state->record.hops[hop_count & (CONNREDIR_MAX_HOPS - 1)];
		hop->service_id = service_id;
		hop->reserved = 0;
		hop->time_ns = bpf_ktime_get_boot_ns();
		hop->original_dst = *dst;
		/* The local address is known once the socket is bound (sockops). */
		__builtin_memset(&hop->local, 0, sizeof(hop->local));
		state->record.hop_count = hop_count + 1;
		state->flags |= CONNREDIR_SOCK_HANDOFF_PENDING;
		note_connecting_process(state, caller.uid);
		count(CONNREDIR_CNT_REDIRECTS);
		count_hit(rule->rule_id);
		ev->decision = CONNREDIR_DECISION_REDIRECTED;
		return want_v6 ? &service->listen6 : &service->listen4;
	}
	if (skipped)
		count(CONNREDIR_CNT_LOOPS_PREVENTED);
	return NULL;
}

/* decide(), and the decision to the trace when someone reads it. */
static __always_inline const struct connredir_endpoint *
decide_traced(struct bpf_sock *sk, const struct connredir_endpoint *dst, int want_v6)
{
	struct connredir_trace_event ev = {};
	const struct connredir_endpoint *target = decide(sk, dst, want_v6, &ev);

	if (tracing()) {
		ev.dst = *dst;
		emit(&ev);
	}
	return target;
}

SEC("cgroup/connect4")
int connredir_connect4(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 ip = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;
	struct bpf_sock *sk = ctx->sk;
	const struct connredir_endpoint *target;
	struct connredir_endpoint dst;

	if (type != SOCK_STREAM || !sk)
		return 1;
	endpoint_set_v4(&dst, ip, port);
	target = decide_traced(sk, &dst, 0);
	if (target) {
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
	const struct connredir_endpoint *target;
	struct connredir_endpoint dst;
	int mapped;

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (type != SOCK_STREAM || !sk)
		return 1;
	/* An IPv4-mapped destination follows the IPv4 rules and listeners. */
	mapped = is_v4_mapped(ip6);
	endpoint_set_v6(&dst, ip6, port);
	target = decide_traced(sk, &dst, !mapped);
	if (!target)
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
