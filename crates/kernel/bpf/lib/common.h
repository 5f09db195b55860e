/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What every connredir BPF file starts from: the kernel and libbpf headers,
 * the shared ABI (abi.h), the few constants of user-space headers that BPF
 * code cannot include, and ctx_read().
 */
#ifndef CONNREDIR_COMMON_H
#define CONNREDIR_COMMON_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "abi.h"

/* From <sys/socket.h> and <netinet/tcp.h>, which are not usable here. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOL_IP 0
#define SOL_IPV6 41

enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_CLOSE = 7,
	TCP_LISTEN = 10,
	TCP_NEW_SYN_RECV = 12,
};

/*
 * A ctx field read the compiler must keep as one fixed-offset load: left to
 * itself, clang may turn `cond ? ctx->a : ctx->b` into a load through a
 * computed ctx pointer, which the verifier rejects.
 */
#define ctx_read(field) (*(volatile typeof(field) *)&(field))

/* The license of every entry file's object; weak, so the linked object
 * keeps one copy. GPL-compatible: the programs call GPL-only helpers. */
char LICENSE[] SEC("license") __weak = "Dual MIT/GPL";

#endif /* CONNREDIR_COMMON_H */
