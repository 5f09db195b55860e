/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The connredir kernel programs, built as one object so they share maps:
 *   redirect.c  cgroup/connect4, cgroup/connect6: where a redirect is decided
 *   accel.c     sk_msg and sockops parts: sockmap acceleration of local legs
 *   handoff.c   sockops: the record travels to the socket the service accepts
 *   sockopt.c   cgroup/getsockopt, cgroup/setsockopt: the redirect operations
 *   bind.c      cgroup/bind4, cgroup/bind6: a service's address is the service's
 */
#include "redirect.c"
#include "accel.c"
#include "handoff.c"
#include "sockopt.c"
#include "bind.c"

char LICENSE[] SEC("license") = "Dual MIT/GPL";
