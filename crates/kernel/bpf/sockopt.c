/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The syscall-level interface: the three redirect operations as
 * getsockopt/setsockopt on the private level CONNREDIR_SOL, and the
 * transparent-proxy SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST answered from the
 * record (a cgroup/connect redirect leaves no conntrack entry to answer it).
 *
 * Buffer protocol of the queries (as the WFP control codes): a length of 0
 * (with a NULL buffer) returns the size needed; a length below 4 is EINVAL;
 * a buffer too small is ENOBUFS (the size needed cannot travel with an error:
 * ask again with 0).
 */
#include "lib/accel.h"
#include "lib/addr.h"
#include "lib/inherit.h"
#include "lib/record.h"
#include "lib/seal.h"
#include "lib/service.h"
#include "lib/trace.h"

static __always_inline int is_connected(__u32 state)
{
	return state != TCP_CLOSE && state != TCP_LISTEN && state != TCP_SYN_SENT &&
	       state != TCP_SYN_RECV && state != TCP_NEW_SYN_RECV;
}

/* Checks the buffer protocol; returns 0 to go on and copy, or sets the answer. */
static __always_inline int buffer_check(struct bpf_sockopt *ctx, __s32 optlen, __u32 needed)
{
	if (optlen == 0) {
		ctx->optlen = needed;
		ctx->retval = 0;
		return 1;
	}
	if (optlen < (__s32)sizeof(__u32)) {
		ctx->retval = -EINVAL;
		return 1;
	}
	if (optlen < (__s32)needed) {
		ctx->retval = -ENOBUFS;
		return 1;
	}
	return 0;
}

/* The socket's record, from its state or else (`small`) its one-hop form. */
static __always_inline void get_records(struct bpf_sockopt *ctx, __s32 optlen, void *optval,
					void *optval_end,
					const struct connredir_sock_state *state,
					const struct connredir_sock_hop *small)
{
	struct connredir_record *out = optval;
	const struct connredir_seal_key *key;

	if (buffer_check(ctx, optlen, sizeof(*out)))
		return;
	if ((void *)(out + 1) > optval_end) {
		ctx->retval = -ENOBUFS;
		return;
	}
	if (state) {
		*out = state->record;
	} else if (small) {
		__builtin_memset(out, 0, sizeof(*out));
		record_from_hop(out, small);
	} else {
		ctx->retval = -ENOENT;
		return;
	}
	/*
	 * Sealed here, as the record leaves the layer, rather than wherever the
	 * layer writes records (connect, hand-off, inheritance, set): one place
	 * covers every writer, and connections whose records nobody asks for
	 * pay nothing. The stored record never needs a seal: only what comes
	 * back through setsockopt is checked. The seal is made of the copy
	 * just written, which is the record whichever form it was kept in.
	 */
	key = seal_key_get();
	out->seal = key ? seal_of(key, out) : 0;
	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
}

static __always_inline void get_context(struct bpf_sockopt *ctx, __s32 optlen, void *optval,
					void *optval_end,
					const struct connredir_sock_state *state,
					const struct connredir_sock_hop *small)
{
	struct caller_services caller;
	const struct connredir_hop *hop = NULL;
	struct connredir_service *service;
	__u32 service_id, len;

	caller_services(&caller);
	if (state)
		hop = own_hop(&state->record, &caller);
	else if (small && caller_is(&caller, small->hop.service_id))
		hop = &small->hop;
	if (!hop) {
		/* Neither redirected by self nor previously by self. */
		ctx->retval = -EACCES;
		return;
	}
	service_id = hop->service_id;
	service = bpf_map_lookup_elem(&services, &service_id);
	len = service ? service->context_len : 0;
	if (len > CONNREDIR_MAX_CONTEXT)
		len = CONNREDIR_MAX_CONTEXT;

	if (len == 0 || !service) {
		struct connredir_default_context *out = optval;

		if (buffer_check(ctx, optlen, sizeof(*out)))
			return;
		if ((void *)(out + 1) > optval_end) {
			ctx->retval = -ENOBUFS;
			return;
		}
		out->remote = hop->original_dst;
		out->local = hop->local;
		ctx->optlen = sizeof(*out);
		ctx->retval = 0;
		return;
	}

	if (buffer_check(ctx, optlen, len))
		return;
	for (__u32 i = 0; i < CONNREDIR_MAX_CONTEXT; i++) {
		__u8 *byte = (__u8 *)optval + i;

		if (i >= len)
			break;
		if ((void *)(byte + 1) > optval_end) {
			ctx->retval = -ENOBUFS;
			return;
		}
		*byte = service->context[i];
	}
	ctx->optlen = len;
	ctx->retval = 0;
}

/* The service registered for a listening (TCP) or bound (UDP) socket's local address. */
static __always_inline void get_service(struct bpf_sockopt *ctx, __s32 optlen, void *optval,
					void *optval_end, struct bpf_sock *sk)
{
	struct connredir_addr_key key = {};
	__u32 *out = optval;
	__u32 sk_state, protocol, family, port, ip4, ip6[4];
	__u32 *id;

	if (!sk) {
		ctx->retval = -EINVAL;
		return;
	}
	sk_state = ctx_read(sk->state);
	protocol = ctx_read(sk->protocol);
	family = ctx_read(sk->family);
	port = ctx_read(sk->src_port);
	ip4 = ctx_read(sk->src_ip4);
	ip6[0] = ctx_read(sk->src_ip6[0]);
	ip6[1] = ctx_read(sk->src_ip6[1]);
	ip6[2] = ctx_read(sk->src_ip6[2]);
	ip6[3] = ctx_read(sk->src_ip6[3]);
	/* A TCP socket once it listens; a UDP socket once it is bound (UDP has
	 * no listen: a service receives on its bound socket). */
	if (protocol == IPPROTO_UDP ? port == 0 : sk_state != TCP_LISTEN) {
		ctx->retval = -EINVAL;
		return;
	}
	/* The key as the engine writes it: IPv4 as IPv4-mapped IPv6. */
	if (family == AF_INET) {
		ip6[0] = 0;
		ip6[1] = 0;
		ip6[2] = bpf_htonl(0xffff);
		ip6[3] = ip4;
	}
	__builtin_memcpy(key.addr, ip6, sizeof(ip6));
	key.port = port;
	id = bpf_map_lookup_elem(&service_addrs, &key);
	if (!id) {
		ctx->retval = -ENOENT;
		return;
	}
	if (buffer_check(ctx, optlen, sizeof(*out)))
		return;
	if ((void *)(out + 1) > optval_end) {
		ctx->retval = -ENOBUFS;
		return;
	}
	*out = *id;
	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
}

/* SO_ORIGINAL_DST from the socket's state or else (`small`) its record's
 * one-hop form; neither: the kernel answers (conntrack, or an error). */
static __always_inline void get_original_dst(struct bpf_sockopt *ctx, int level, __s32 optlen,
					     void *optval, void *optval_end,
					     struct connredir_sock_state *state,
					     struct connredir_sock_hop *small)
{
	const struct connredir_endpoint *dst;
	__u32 hop_count;

	/* The destination the connection had when it was redirected to us. */
	if (state) {
		hop_count = clamp_hops(state->record.hop_count);
		if (hop_count == 0)
			return;
		dst = &state->record.hops[(hop_count - 1) & (CONNREDIR_MAX_HOPS - 1)].original_dst;
	} else if (small) {
		dst = &small->hop.original_dst;
	} else {
		return;
	}

	if (level == SOL_IP) {
		struct sockaddr_in *out = optval;

		if (dst->family != AF_INET || optlen < (__s32)sizeof(*out) ||
		    (void *)(out + 1) > optval_end)
			return;
		__builtin_memset(out, 0, sizeof(*out));
		out->sin_family = AF_INET;
		out->sin_port = dst->port;
		out->sin_addr.s_addr = *(const __u32 *)dst->addr;
		ctx->optlen = sizeof(*out);
	} else {
		struct sockaddr_in6 *out = optval;
		__u32 ip6[4];

		if (optlen < (__s32)sizeof(*out) || (void *)(out + 1) > optval_end)
			return;
		endpoint_to_mapped(dst, ip6);
		__builtin_memset(out, 0, sizeof(*out));
		out->sin6_family = AF_INET6;
		out->sin6_port = dst->port;
		__builtin_memcpy(&out->sin6_addr, ip6, 16);
		out->sin6_scope_id = dst->scope_id;
		ctx->optlen = sizeof(*out);
	}
	ctx->retval = 0;
	count(CONNREDIR_CNT_ORIGINAL_DST_ANSWERED);
	if (state)
		inherit_keep(bpf_get_netns_cookie(ctx), state, dst);
	else
		inherit_keep_hop(bpf_get_netns_cookie(ctx), small, dst);
}

SEC("cgroup/getsockopt")
int connredir_getsockopt(struct bpf_sockopt *ctx)
{
	int level = ctx->level;
	int optname = ctx->optname;
	__s32 optlen = ctx->optlen;
	struct bpf_sock *sk = ctx->sk;
	void *optval = ctx->optval;
	void *optval_end = ctx->optval_end;
	struct connredir_sock_state *state;
	struct connredir_sock_hop *small;
	__u32 sk_state;

	if (level == CONNREDIR_SOL && optname == CONNREDIR_SO_ACCELERATED) {
		__u32 *out = optval;

		if (!sk || optlen < (__s32)sizeof(*out) || (void *)(out + 1) > optval_end) {
			ctx->retval = -EINVAL;
			return 1;
		}
		*out = accel_socket(ctx, sk);
		/* Two separate 4-byte stores: clang would merge them into one
		 * 8-byte store, which the verifier refuses. */
		*(volatile __s32 *)&ctx->optlen = sizeof(*out);
		*(volatile __s32 *)&ctx->retval = 0;
		return 1;
	}
	if (level == CONNREDIR_SOL && optname == CONNREDIR_SO_BYTES_WRITTEN) {
		__u64 *out = optval;
		__s64 written;

		if (!sk || optlen < (__s32)sizeof(*out) || (void *)(out + 1) > optval_end) {
			ctx->retval = -EINVAL;
			return 1;
		}
		written = accel_written_into(ctx, sk);
		if (written < 0) {
			ctx->retval = (__s32)written;
			return 1;
		}
		*out = (__u64)written;
		*(volatile __s32 *)&ctx->optlen = sizeof(*out);
		*(volatile __s32 *)&ctx->retval = 0;
		return 1;
	}
	if (level == CONNREDIR_SOL) {
		if (optname == CONNREDIR_SO_SERVICE) {
			get_service(ctx, optlen, optval, optval_end, sk);
			return 1;
		}
		if (optname != CONNREDIR_SO_RECORDS && optname != CONNREDIR_SO_CONTEXT) {
			ctx->retval = -ENOPROTOOPT;
			return 1;
		}
		if (!sk) {
			ctx->retval = -EINVAL;
			return 1;
		}
		sk_state = sk->state;
		if (!is_connected(sk_state)) {
			ctx->retval = -ENOTCONN;
			return 1;
		}
		state = record_holder(sk, &small);
		if (!state && !small) {
			ctx->retval = -ENOENT;
			return 1;
		}
		if (optname == CONNREDIR_SO_RECORDS)
			get_records(ctx, optlen, optval, optval_end, state, small);
		else
			get_context(ctx, optlen, optval, optval_end, state, small);
		return 1;
	}

	if ((level == SOL_IP && optname == CONNREDIR_SO_ORIGINAL_DST) ||
	    (level == SOL_IPV6 && optname == CONNREDIR_IP6T_SO_ORIGINAL_DST)) {
		if (!sk)
			return 1;
		state = record_holder(sk, &small);
		if (state || small)
			get_original_dst(ctx, level, optlen, optval, optval_end, state, small);
	}
	return 1;
}

static __always_inline int reject(__s32 err)
{
	bpf_set_retval(err);
	return 0;
}

SEC("cgroup/setsockopt")
int connredir_setsockopt(struct bpf_sockopt *ctx)
{
	int level = ctx->level;
	int optname = ctx->optname;
	__s32 optlen = ctx->optlen;
	struct bpf_sock *sk = ctx->sk;
	void *optval = ctx->optval;
	void *optval_end = ctx->optval_end;
	const struct connredir_record *in = optval;
	struct connredir_sock_state *state;
	struct caller_services caller;
	__u32 sk_state, least;

	if (level != CONNREDIR_SOL)
		return 1;
	if (optname == CONNREDIR_SO_CUT_THROUGH) {
		const struct connredir_cut_through *req = optval;
		int err;

		if (!sk || optlen < (__s32)sizeof(*req) || (void *)(req + 1) > optval_end)
			return reject(-EINVAL);
		err = accel_cut_through(ctx, sk, req);
		if (err)
			return reject(err);
		ctx->optlen = -1;
		return 1;
	}
	if (optname != CONNREDIR_SO_RECORDS)
		return reject(-ENOPROTOOPT);
	/* Root and registered services only: a forged record would let a
	 * client skip inspection. */
	caller_services(&caller);
	if (caller.uid != 0 && !caller.by_pid && !caller.by_cgroup && !caller.by_uid) {
		count(CONNREDIR_CNT_DENIED_SETS);
		return reject(-EACCES);
	}
	if (!sk)
		return reject(-EINVAL);
	sk_state = sk->state;
	if (sk_state != TCP_CLOSE)
		return reject(sk_state == TCP_LISTEN ? -EINVAL : -EISCONN);
	/* A version 1 blob ends before client_comm, a version 2 before the seal. */
	if (optlen < (__s32)CONNREDIR_RECORD_V1_SIZE ||
	    (void *)in + CONNREDIR_RECORD_V1_SIZE > optval_end)
		return reject(-EINVAL);
	least = in->version == 1   ? CONNREDIR_RECORD_V1_SIZE :
		in->version == 2 ? CONNREDIR_RECORD_V2_SIZE :
				   sizeof(*in);
	if (in->magic != CONNREDIR_RECORD_MAGIC || in->version == 0 ||
	    in->version > CONNREDIR_RECORD_VERSION || in->size > optlen || in->size < least ||
	    in->hop_count > CONNREDIR_MAX_HOPS)
		return reject(-EINVAL);
	/* Root may set any well-formed record (as administrators on Windows);
	 * a service only its own, as the layer issued it. */
	if (caller.uid != 0 &&
	    ((void *)(in + 1) > optval_end || !is_callers_sealed_record(in, &caller))) {
		count(CONNREDIR_CNT_FORGED_RECORDS);
		return reject(-EACCES);
	}

	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return reject(-ENOMEM);
	/* A socket disconnected after a redirect may still hold that
	 * redirect's one-hop form (lib/handoff.h): the state replaces it. */
	bpf_sk_storage_delete(&sock_hop, sk);
	if (in->version >= 3 && (void *)(in + 1) <= optval_end) {
		state->record = *in;
	} else if (in->version == 2 && (void *)in + CONNREDIR_RECORD_V2_SIZE <= optval_end) {
		__builtin_memcpy(&state->record, in, CONNREDIR_RECORD_V2_SIZE);
	} else {
		__builtin_memcpy(&state->record, in, CONNREDIR_RECORD_V1_SIZE);
		__builtin_memset(state->record.client_comm, 0,
				 sizeof(state->record.client_comm));
	}
	/* Kept as this layer's version, whatever the blob's; the seal is made
	 * afresh whenever the record is handed out. */
	state->record.version = CONNREDIR_RECORD_VERSION;
	state->record.size = sizeof(*in);
	state->record.seal = 0;
	/* The seal does not cover unused hop slots: nothing of them is kept. */
	for (__u32 i = 0; i < CONNREDIR_MAX_HOPS; i++) {
		if (i >= in->hop_count)
			__builtin_memset(&state->record.hops[i], 0, sizeof(state->record.hops[i]));
	}
	state->onward_service = caller_accelerates();
	state->flags = state->onward_service ? CONNREDIR_SOCK_ACCEL_ONWARD : 0;
	count(CONNREDIR_CNT_RECORDS_SET);
	/* Consumed here: the kernel never sees this private level. */
	ctx->optlen = -1;
	return 1;
}
