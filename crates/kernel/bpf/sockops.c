/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * sockops: the TCP events of every socket in the attached cgroups, passed
 * on by event to the record hand-off (lib/handoff.h), records-less
 * inheritance (lib/inherit.h) and acceleration (lib/accel.h).
 */
#include "lib/accel.h"
#include "lib/addr.h"
#include "lib/handoff.h"
#include "lib/inherit.h"

SEC("sockops")
int connredir_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	struct bpf_sock *sk = skops->sk;
	__u32 cb_flags = skops->bpf_sock_ops_cb_flags;
	__u32 new_state = skops->args[1];
	struct tuple t = {};
	__u64 netns;

	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	read_tuple(skops, &t);
	/* Every key that names a socket by address carries its namespace. */
	netns = bpf_get_netns_cookie(skops);

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (sk)
			handoff_on_connect(skops, sk, netns, &t, cb_flags);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (sk)
			accel_on_active(skops, sk, netns, &t, cb_flags);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		/* Closing removes what a records-less service kept (lib/inherit.h). */
		if (sk && handoff_on_passive_established(sk, netns, &t)) {
			cb_flags |= BPF_SOCK_OPS_STATE_CB_FLAG;
			bpf_sock_ops_cb_flags_set(skops, cb_flags);
		}
		accel_on_passive(skops, netns, &t, cb_flags);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (new_state == TCP_CLOSE) {
			handoff_on_close(skops, netns, &t);
			inherit_on_close(skops, sk);
			accel_on_close(sk, netns, &t);
		}
		break;
	}
	return 1;
}
