/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * sk_msg, attached to the accel_socks sockhash: every write of an
 * accelerated socket. What happens to it is lib/accel.h's (accel_on_msg).
 */
#include "lib/accel.h"

SEC("sk_msg")
int connredir_accel(struct sk_msg_md *msg)
{
	return accel_on_msg(msg);
}
