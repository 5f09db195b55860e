/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * cgroup/sock_release: a socket of the attached cgroups is being closed. A
 * redirected UDP socket leaves the live-connection list here (lib/conns.h);
 * UDP has no close event in sockops, which lists and unlists TCP legs.
 * Every other socket returns at once: a TCP socket after one field read, a
 * UDP socket the layer never touched after one storage lookup.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/conns.h"

SEC("cgroup/sock_release")
int connredir_sock_release(struct bpf_sock *sk)
{
	if (sk->type != SOCK_DGRAM)
		return 1;
	/* Only a socket the layer redirected (or handed a flow) has state. */
	if (!bpf_sk_storage_get(&sock_state, sk, 0, 0))
		return 1;
	conns_forget(bpf_get_socket_cookie(sk));
	return 1;
}
