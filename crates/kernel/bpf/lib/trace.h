/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What the layer tells about itself: the counters (count(), indices are
 * enum connredir_counter of abi.h) and the decision trace, a ring buffer
 * read by the engine, fed only while someone reads it (trace_control).
 */
#ifndef CONNREDIR_TRACE_H
#define CONNREDIR_TRACE_H

#include "maps.h"

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &counter);

	if (value)
		*value += 1;
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

#endif /* CONNREDIR_TRACE_H */
