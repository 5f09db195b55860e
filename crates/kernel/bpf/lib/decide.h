/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * Where a redirect is decided: decide(), called by cgroup/connect4 and
 * cgroup/connect6 (connect.c) for every TCP connect() in the cgroups they
 * are attached to.
 *
 * The rules that match the destination come from one LPM-trie lookup (user
 * space merges every rule whose prefix covers a longer one into the longer
 * prefix's set, already in evaluation order). A rule is
 * skipped when its service already handled this flow (its id is in the
 * socket's redirect record) or, unless the service says otherwise, when the
 * connecting process is the service itself; the first remaining rule wins:
 * the destination becomes the service's listening address and a hop is
 * appended to the record.
 *
 * The promise holds against the client: a socket's own earlier redirect is
 * taken back before each connect (the attempt may have failed or been
 * disconnected), a service is only ever reached through its own listener
 * (listener.h) and its failure policy decides while that is absent, and a
 * selected connect whose record cannot be written is refused, never let
 * through.
 *
 * judge_rule() here and listener_state() (listener.h) are global functions,
 * verified on their own: only one entry file (connect.c) may include this
 * header, or the linked object would define them twice.
 */
#ifndef CONNREDIR_DECIDE_H
#define CONNREDIR_DECIDE_H

#include "maps.h"
#include "trace.h"
#include "service.h"
#include "record.h"
#include "inherit_take.h"
#include "listener.h"
#include "exe.h"

/* What decide() tells the connect program to do. */
enum verdict {
	VERDICT_LEAVE = 0, /* the connection goes where it was going */
	VERDICT_REDIRECT = 1, /* to the service's listener */
	VERDICT_REFUSE = 2, /* connect() fails with the errno in `refusal` */
};

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

/* Notes who connected, for the live-connection list (see handoff.h); on
 * the flow's first redirect, the same process is the record's client (read
 * once, copied). */
static __always_inline void note_connecting_process(struct connredir_sock_state *state,
						    __u32 tgid, __u32 uid, int first)
{
	__u64 cgroup_id = bpf_get_current_cgroup_id();

	state->pid = tgid;
	state->uid = uid;
	state->cgroup_id = cgroup_id;
	bpf_get_current_comm(state->comm, sizeof(state->comm));
	if (first) {
		state->record.client_pid = tgid;
		state->record.client_uid = uid;
		state->record.client_cgroup_id = cgroup_id;
		__builtin_memcpy(state->record.client_comm, state->comm,
				 sizeof(state->record.client_comm));
	}
}

/* What judge_rule() needs to know of the connect, gathered once. */
struct judge_env {
	struct caller_services caller;
	struct chain_summary chain;
	__u32 tgid;
	__u32 uid;
	__u32 port; /* host order */
	__u32 want_v6;
	__u32 protocol; /* CONNREDIR_PROTO_TCP or CONNREDIR_PROTO_UDP */
	__u8 flow_state; /* out: the flow's state for the rule's service */
	__u8 reserved[3];
};

/* How one rule stands for a connect. */
enum judged {
	JUDGED_NO_MATCH = 0, /* protocol, port, uid or listener family differ */
	JUDGED_BY_SELF = 1, /* its service handled (or opened) the flow */
	JUDGED_SELF_LOOP = 2, /* the caller is its service's listening process */
	JUDGED_BYPASSED = 3, /* its service is down and lets flows pass */
	JUDGED_DOWN = 4, /* it decides, but its service is down: refuse */
	JUDGED_TAKE = 5, /* it decides: redirect to its service */
	JUDGED_PERMIT = 6, /* a permit rule decides: the flow goes direct */
	JUDGED_BLOCK = 7, /* a block rule decides: the connect is refused */
};

/* The low `len` bytes (of 8) of a little-endian word. */
static __always_inline __u64 low_bytes(__u32 len)
{
	return len >= 8 ? ~0ull : (1ull << (len * 8)) - 1;
}

/*
 * Whether the caller's command name is the rule's or, with
 * CONNREDIR_COMM_PREFIX, starts with it. Both names are NUL padded to 16
 * bytes, so an exact match is equality of all 16, and a prefix match that
 * of the first comm_len bytes: two masked words, no loop.
 */
__noinline int comm_matches(const struct connredir_rule *rule)
{
	__u32 len;
	__u64 want[2], have[2] = {}, mask_lo = ~0ull, mask_hi = ~0ull;

	/* A global function of its own: its stack is not added to the
	 * listener_state() chain's (main program, judge_rule(), 512 bytes). */
	if (!rule)
		return 0;
	len = rule->comm_len & CONNREDIR_COMM_LEN_MASK;
	__builtin_memcpy(want, rule->comm, 16);
	bpf_get_current_comm(have, sizeof(have));
	if (rule->comm_len & CONNREDIR_COMM_PREFIX) {
		if (len > 16)
			len = 16;
		mask_lo = low_bytes(len);
		mask_hi = len > 8 ? low_bytes(len - 8) : 0;
	}
	return ((want[0] ^ have[0]) & mask_lo) == 0 && ((want[1] ^ have[1]) & mask_hi) == 0;
}

/*
 * Whether the caller's executable file name (exe.h) is the rule's, which
 * is kept in rule_exes under the rule's id (CONNREDIR_EXE_LEN bytes, NUL
 * padded; no entry: the condition does not hold). The name is read into
 * one word more than that, zeroed first, so that word is zero exactly
 * when the name is not longer: the whole name is compared, as five words,
 * no loop, straight from the map value (a copy on the stack would not fit
 * beside the main program's and judge_rule()'s in 512 bytes). A global
 * function for the same reason as comm_matches().
 */
__noinline int exe_matches(const struct connredir_rule *rule)
{
	const struct connredir_exe_name *want;
	const __u64 *w;
	__u64 have[CONNREDIR_EXE_LEN / 8 + 1] = {};
	__u32 rule_id;

	if (!rule)
		return 0;
	rule_id = rule->rule_id;
	want = bpf_map_lookup_elem(&rule_exes, &rule_id);
	if (!want)
		return 0;
	/* Map values are 8-byte aligned. */
	w = (const __u64 *)want->name;
	read_exe_name(have, sizeof(have));
	return ((w[0] ^ have[0]) | (w[1] ^ have[1]) | (w[2] ^ have[2]) | (w[3] ^ have[3]) |
		have[4]) == 0;
}

/*
 * Whether the rule's conditions on the connecting process and on the flow
 * hold: uid, gid, local port, command name, executable name, cgroup
 * subtree and chain. The
 * cheap ones first; a helper is called only when the rule names it.
 */
static __always_inline int conditions_hold(struct bpf_sock_addr *ctx,
					   const struct connredir_rule *rule,
					   const struct judge_env *env)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 local_port = sk ? sk->src_port : 0; /* host order; 0 if unbound */

	if (rule->uid != CONNREDIR_ANY_UID && rule->uid != env->uid)
		return 0;
	if (rule->gid != CONNREDIR_ANY_GID &&
	    rule->gid != (__u32)(bpf_get_current_uid_gid() >> 32))
		return 0;
	if (local_port < rule->local_port_min || local_port > rule->local_port_max)
		return 0;
	/* `after`: the record must already name that service. */
	if (rule->after && !(env->chain.seen & service_bit(rule->after)))
		return 0;
	if (rule->comm_len && !comm_matches(rule))
		return 0;
	if ((rule->flags & CONNREDIR_RULE_EXE) && !exe_matches(rule))
		return 0;
	/* Any descendant of the rule's cgroup: the caller's ancestor at that
	 * cgroup's depth is that cgroup (0 when the caller is shallower). */
	if (rule->cgroup_id &&
	    bpf_get_current_ancestor_cgroup_id(rule->cgroup_level) != rule->cgroup_id)
		return 0;
	return 1;
}

/* Whether `rule` may apply to a connect of `protocol` to `port` (host
 * order), by its protocol and destination ports alone: the rest of its
 * conditions are the caller's and the flow's. */
static __always_inline int rule_may_apply(const struct connredir_rule *rule, __u32 protocol,
					  __u16 port)
{
	return (rule->protocol == protocol || rule->protocol == CONNREDIR_PROTO_TCP_AND_UDP) &&
	       port >= rule->port_min && port <= rule->port_max;
}

__noinline int judge_rule(struct bpf_sock_addr *ctx, const struct connredir_rule *rule,
			  struct judge_env *env)
{
	struct connredir_service *service;
	__u32 service_id;
	__u8 flow_state;
	int listener;

	if (!ctx || !rule || !env)
		return JUDGED_NO_MATCH;
	if (!rule_may_apply(rule, env->protocol, env->port))
		return JUDGED_NO_MATCH;
	if (!conditions_hold(ctx, rule, env))
		return JUDGED_NO_MATCH;
	if (rule->action == CONNREDIR_ACTION_PERMIT)
		return JUDGED_PERMIT;
	if (rule->action == CONNREDIR_ACTION_BLOCK)
		return JUDGED_BLOCK;
	service_id = rule->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service || !(service->flags & CONNREDIR_SERVICE_ACTIVE))
		return JUDGED_NO_MATCH;
	if (!(service->flags &
	      (env->want_v6 ? CONNREDIR_SERVICE_LISTEN6 : CONNREDIR_SERVICE_LISTEN4)))
		return JUDGED_NO_MATCH;

	/* A service never takes a flow it handled (or, if it says so, opened:
	 * connecting now, or as the record's client). */
	flow_state = chain_state(&env->chain, service_id);
	if ((service->flags & CONNREDIR_SERVICE_OWN_BY_SELF) &&
	    (caller_is(&env->caller, service_id) || (env->chain.opened_by & service_bit(service_id))) &&
	    (flow_state == CONNREDIR_STATE_NOT_REDIRECTED || flow_state == CONNREDIR_STATE_BY_OTHER))
		flow_state = CONNREDIR_STATE_BY_SELF;
	env->flow_state = flow_state;
	if (flow_state == CONNREDIR_STATE_BY_SELF ||
	    flow_state == CONNREDIR_STATE_PREVIOUSLY_BY_SELF)
		return JUDGED_BY_SELF;

	listener = listener_state(ctx, service_id, env->want_v6, env->tgid,
				  env->protocol == CONNREDIR_PROTO_UDP);
	if (listener == LISTENER_CALLER) {
		/* The service's own listening process, not known by its
		 * identity (which may have drifted): its flow, not a loop. */
		env->flow_state = CONNREDIR_STATE_BY_SELF;
		return JUDGED_SELF_LOOP;
	}
	if (listener == LISTENER_ABSENT)
		return (service->flags & CONNREDIR_SERVICE_BYPASS_WHEN_DOWN) ? JUDGED_BYPASSED
									       : JUDGED_DOWN;
	return JUDGED_TAKE;
}

/*
 * Readies the connecting socket's state (`ctx`'s socket, connecting to
 * `dst`) for the decision: a socket that holds the one-hop form of its own
 * earlier redirect (handoff.h) has no other state, and loses it: taken back
 * whole, it connects as a new socket would (its chain was that hop alone);
 * a socket with state takes back the hop its own earlier connect added
 * (undo_own_hop); a socket without takes a record its process queued, when
 * it is a records-less service's onward connect (inherit_take.h). The
 * caller then looks the state up. A global function, verified once on its
 * own: these branches, inline, would multiply the paths of the rule loop
 * that follows. Returns whether the socket has a state.
 */
__noinline int ready_state(struct bpf_sock_addr *ctx, const struct connredir_endpoint *dst)
{
	struct connredir_sock_state *state;
	struct bpf_sock *sk = ctx->sk;

	if (!sk || !dst)
		return 0;
	bpf_sk_storage_delete(&sock_hop, sk);
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (state) {
		undo_own_hop(state);
		return 1;
	}
	return inherit_take(ctx, dst);
}

/*
 * Whether a rule of `set` can apply to a connect of `protocol` to `port`
 * (host order), by the rules' protocol and destination ports alone. A
 * global function, verified once on its own, as judge_rule().
 */
__noinline int any_rule_for(const struct connredir_rule_set *set, __u32 protocol, __u16 port)
{
	__u32 count_rules;

	if (!set)
		return 0;
	count_rules = set->count;
	for (__u32 i = 0; i < CONNREDIR_MAX_RULES_PER_PREFIX; i++) {
		const struct connredir_rule *rule = &set->rules[i];

		if (i >= count_rules)
			break;
		if (rule_may_apply(rule, protocol, port))
			return 1;
	}
	return 0;
}

/*
 * Decides the fate of a connect to `dst`: VERDICT_REDIRECT with `*target`
 * the service's listening endpoint, VERDICT_LEAVE, or VERDICT_REFUSE with
 * `*refusal` the errno. `ev` gets the decision, the rule, the service and
 * the redirect state. `want_v6` asks for the service's IPv6 listener (native
 * IPv6 destination).
 */
static __always_inline int decide(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
				  const struct connredir_endpoint *dst, int want_v6, __u32 protocol,
				  struct connredir_trace_event *ev,
				  const struct connredir_endpoint **target, int *refusal)
{
	struct connredir_rule_key key = {};
	struct connredir_rule_set *set;
	struct connredir_sock_state *state;
	const struct connredir_rule *rule;
	struct connredir_service *service;
	struct connredir_hop *hop;
	__u32 hop_count = 0, count_rules, service_id, tgid;
	__u16 port = bpf_ntohs(dst->port);
	struct judge_env env = {};
	int skipped = 0, bypassed = 0, down = 0, chosen = -1, settled = 0;
	__u8 chosen_state = 0;

	ev->decision = CONNREDIR_DECISION_NO_RULE;
	key.data[0] = rules_generation();
	key.data[1] = want_v6 ? 6 : 4;
	key.prefixlen = 16 + (want_v6 ? 128 : 32);
	__builtin_memcpy(&key.data[2], dst->addr, 16);
	set = bpf_map_lookup_elem(&rules, &key);
	/* A connect that no rule of its set can apply to (another protocol or
	 * port) is left as one outside every rule's prefix is, before anything
	 * about the caller or the socket is read: with a rule on 0.0.0.0/0
	 * port 443, every destination has a rule set. */
	if (!set || !any_rule_for(set, protocol, port))
		return VERDICT_LEAVE;

	/* Only connects that a rule may select pay for what follows. */
	tgid = bpf_get_current_pid_tgid() >> 32;
	/* The caller and the chain are gathered straight into `env`: a copy
	 * would cost stack, and the main program, judge_rule() and
	 * listener_state() share 512 bytes. */
	caller_services(&env.caller);
	ready_state(ctx, dst);
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (state)
		hop_count = clamp_hops(state->record.hop_count);
	ev->hop_count = hop_count;
	if (state)
		summarise_chain(&state->record, hop_count, &env.chain);

	/* Find the deciding rule; what it leads to is worked out after the
	 * loop, once. Each rule is judged by a global function, verified once
	 * on its own: inline, its branches multiplied by the loop's iterations
	 * exceed the verifier's budget. */
	env.tgid = tgid;
	env.uid = env.caller.uid;
	env.port = port;
	env.want_v6 = want_v6;
	env.protocol = protocol;
	count_rules = set->count;
	for (__u32 i = 0; i < CONNREDIR_MAX_RULES_PER_PREFIX; i++) {
		int judged;

		if (i >= count_rules)
			break;
		rule = &set->rules[i];
		judged = judge_rule(ctx, rule, &env);
		if (judged == JUDGED_NO_MATCH)
			continue;
		if (judged == JUDGED_BY_SELF || judged == JUDGED_SELF_LOOP) {
			if (!skipped) {
				ev->decision = CONNREDIR_DECISION_LOOP_PREVENTED;
				ev->rule_id = rule->rule_id;
				ev->service_id = rule->service_id;
				ev->state = env.flow_state;
			}
			if (judged == JUDGED_SELF_LOOP)
				count(CONNREDIR_CNT_SELF_LOOPS);
			skipped = 1;
			continue;
		}
		if (judged == JUDGED_BYPASSED) {
			count(CONNREDIR_CNT_SERVICE_DOWN_BYPASSED);
			bypassed = 1;
			continue;
		}
		chosen = i;
		chosen_state = env.flow_state;
		down = judged == JUDGED_DOWN;
		if (judged == JUDGED_PERMIT || judged == JUDGED_BLOCK)
			settled = judged;
		break;
	}
	if (skipped)
		count(CONNREDIR_CNT_LOOPS_PREVENTED);
	if (chosen < 0) {
		if (!skipped && bypassed)
			ev->decision = CONNREDIR_DECISION_SERVICE_DOWN_BYPASSED;
		return VERDICT_LEAVE;
	}

	rule = &set->rules[chosen & (CONNREDIR_MAX_RULES_PER_PREFIX - 1)];
	if (settled) {
		/* Permit and block: no service, no record; evaluation stops. */
		ev->rule_id = rule->rule_id;
		ev->service_id = 0;
		ev->state = chosen_state;
		count_hit(rule->rule_id);
		if (settled == JUDGED_PERMIT) {
			ev->decision = CONNREDIR_DECISION_PERMITTED;
			count(CONNREDIR_CNT_PERMITTED);
			return VERDICT_LEAVE;
		}
		ev->decision = CONNREDIR_DECISION_BLOCKED;
		count(CONNREDIR_CNT_BLOCKED);
		*refusal = -EACCES;
		return VERDICT_REFUSE;
	}
	service_id = rule->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	if (!service)
		return VERDICT_LEAVE;
	ev->rule_id = rule->rule_id;
	ev->service_id = service_id;
	ev->state = chosen_state;
	if (down) {
		ev->decision = CONNREDIR_DECISION_SERVICE_DOWN;
		count(CONNREDIR_CNT_SERVICE_DOWN_BLOCKED);
		*refusal = -ECONNREFUSED;
		return VERDICT_REFUSE;
	}
	if (hop_count >= CONNREDIR_MAX_HOPS) {
		ev->decision = CONNREDIR_DECISION_HOP_LIMIT;
		count(CONNREDIR_CNT_HOP_LIMIT);
		return VERDICT_LEAVE;
	}
	if (!state) {
		state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!state) {
			/* Fail closed: a selected flow without its record would
			 * skip the chain. */
			ev->decision = CONNREDIR_DECISION_NO_MEMORY;
			count(CONNREDIR_CNT_FAILED_CLOSED);
			*refusal = -ENOBUFS;
			return VERDICT_REFUSE;
		}
	}
	if (hop_count == 0) {
		/* First redirect: this process opened the flow (its pid, uid,
		 * cgroup and command: note_connecting_process below). */
		state->record.magic = CONNREDIR_RECORD_MAGIC;
		state->record.version = CONNREDIR_RECORD_VERSION;
		state->record.size = sizeof(struct connredir_record);
	}
	hop = &state->record.hops[hop_count & (CONNREDIR_MAX_HOPS - 1)];
	hop->service_id = service_id;
	hop->reserved = 0;
	hop->time_ns = bpf_ktime_get_boot_ns();
	hop->original_dst = *dst;
	/* The local address is known once the socket is bound (sockops). */
	__builtin_memset(&hop->local, 0, sizeof(hop->local));
	state->record.hop_count = hop_count + 1;
	state->flags |= CONNREDIR_SOCK_HANDOFF_PENDING | CONNREDIR_SOCK_OWN_HOP;
	note_connecting_process(state, tgid, env.caller.uid, hop_count == 0);
	count(CONNREDIR_CNT_REDIRECTS);
	count_hit(rule->rule_id);
	ev->decision = CONNREDIR_DECISION_REDIRECTED;
	*target = want_v6 ? &service->listen6 : &service->listen4;
	return VERDICT_REDIRECT;
}

/* decide(), and the decision to the trace when someone reads it. */
static __always_inline int decide_traced(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
					 const struct connredir_endpoint *dst, int want_v6,
					 __u32 protocol, const struct connredir_endpoint **target,
					 int *refusal)
{
	struct connredir_trace_event ev = {};
	int verdict = decide(ctx, sk, dst, want_v6, protocol, &ev, target, refusal);

	if (tracing()) {
		ev.dst = *dst;
		ev.protocol = (__u8)protocol;
		emit(&ev);
	}
	return verdict;
}

#endif /* CONNREDIR_DECIDE_H */
