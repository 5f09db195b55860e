/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * A UDP redirect service in C on libconnredir, a thread per flow: receive
 * a client's first datagram on the shared socket, open the service's own
 * socket for that client (connredir_udp_flow_open), read the flow's
 * records, context and original destination there as on an accepted TCP
 * connection, open the onward socket with the records set
 * (connredir_udp_connect_onward), relay both ways until the flow is idle,
 * and print one JSON line per flow on stdout.
 *
 *   cc -o udp_service udp_service.c $(pkg-config --cflags --libs connredir) -pthread
 *   udp_service NAME LISTEN_IPV4:PORT
 *
 * It prints `ready` once it is bound at a registered service's address,
 * and exits with 2 when the address is not one.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <connredir.h>

#include "example.h"

/* A flow ends after this long without a datagram either way. */
#define IDLE_MS 10000
/* Flows at once; datagrams from new clients past it are dropped. */
#define MAX_FLOWS 256

static const char *name;
static uint32_t self_id;
static struct sockaddr_in service;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * The flows by client address. The shared socket may receive a client's
 * datagrams before that client's own socket exists (they were queued
 * already): they go out on the flow's onward socket too.
 */
static struct flow {
	int used;
	struct sockaddr_in client;
	int own, onward;
} flows[MAX_FLOWS];

static int same_client(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
	return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
}

/* Copies datagrams both ways until neither side sends for IDLE_MS. */
static void *relay(void *arg)
{
	struct flow *flow = arg;
	struct pollfd fds[2] = { { .fd = flow->own, .events = POLLIN },
				 { .fd = flow->onward, .events = POLLIN } };
	char buf[65536];

	for (;;) {
		int n = poll(fds, 2, IDLE_MS);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		for (int i = 0; i < 2; i++) {
			ssize_t got;

			if (!(fds[i].revents & POLLIN))
				continue;
			got = recv(fds[i].fd, buf, sizeof(buf), 0);
			/* ECONNREFUSED: an earlier datagram met no socket; go on. */
			if (got >= 0)
				send(fds[1 - i].fd, buf, (size_t)got, 0);
		}
	}
	pthread_mutex_lock(&lock);
	close(flow->own);
	close(flow->onward);
	flow->used = 0;
	pthread_mutex_unlock(&lock);
	return NULL;
}

/*
 * Opens the flow of `client` (whose first datagram is `first`, `len`
 * bytes): its own socket, what the layer says about it, the onward socket
 * with the records; logs it and starts its relay. Called with the lock held.
 */
static void open_flow(struct flow *flow, const struct sockaddr_in *client, const char *first,
		      size_t len)
{
	int own = -1, onward = -1;
	uint32_t records_len = 0, context_len = 0;
	void *records = NULL, *context = NULL;
	struct connredir_record parsed;
	enum connredir_redirect_state state = CONNREDIR_NOT_REDIRECTED;
	struct sockaddr_storage dst, ctx_dst, ctx_local, peer;
	socklen_t dst_len = sizeof(dst), ctx_dst_len = sizeof(ctx_dst),
		  ctx_local_len = sizeof(ctx_local);
	char dst_text[64] = "unknown", ctx_text[64] = "null", peer_text[64], chain[128] = "";
	const char *verdict = "allow", *reason = "null";
	pthread_t thread;

	memcpy(&peer, client, sizeof(*client));
	format_addr(&peer, peer_text, sizeof(peer_text));
	if (connredir_udp_flow_open((const struct sockaddr *)&service, sizeof(service),
				    (const struct sockaddr *)client, sizeof(*client), &own) < 0) {
		verdict = "error";
		reason = "\"could not open the flow's socket\"";
		goto out;
	}

	/* From here on the flow's socket answers as an accepted connection. */
	records = query(own, CONNREDIR_SIO_QUERY_RECORDS, &records_len);
	if (records && connredir_records_parse(records, records_len, &parsed) == 0) {
		size_t at = 0;

		for (uint16_t i = 0; i < parsed.hop_count && at < sizeof(chain); i++)
			at += (size_t)snprintf(chain + at, sizeof(chain) - at, "%s%u", i ? "," : "",
					       parsed.hops[i].service_id);
	}
	connredir_redirect_state(records, records_len, self_id, &state);
	context = query(own, CONNREDIR_SIO_QUERY_CONTEXT, &context_len);
	if (context && connredir_context_addresses(context, context_len, (struct sockaddr *)&ctx_dst,
						   &ctx_dst_len, (struct sockaddr *)&ctx_local,
						   &ctx_local_len) == 0) {
		ctx_text[0] = '"';
		format_addr(&ctx_dst, ctx_text + 1, sizeof(ctx_text) - 2);
		strcat(ctx_text, "\"");
	}
	if (connredir_original_destination(own, (struct sockaddr *)&dst, &dst_len) < 0) {
		verdict = "error";
		reason = "\"no original destination\"";
		goto out;
	}
	format_addr(&dst, dst_text, sizeof(dst_text));
	if (connredir_udp_connect_onward(own, (struct sockaddr *)&dst, dst_len, &onward) < 0) {
		verdict = "error";
		reason = "\"could not connect onward\"";
		goto out;
	}
	send(onward, first, len, 0);
	flow->used = 1;
	flow->client = *client;
	flow->own = own;
	flow->onward = onward;
	if (pthread_create(&thread, NULL, relay, flow) != 0) {
		flow->used = 0;
		verdict = "error";
		reason = "\"no thread\"";
		goto out;
	}
	pthread_detach(thread);
	own = onward = -1;
out:
	printf("{\"proxy\":\"%s\",\"peer\":\"%s\",\"chain\":[%s],\"state\":\"%s\","
	       "\"original_dst\":\"%s\",\"context_dst\":%s,\"records_bytes\":%u,"
	       "\"verdict\":\"%s\",\"reason\":%s}\n",
	       name, peer_text, chain, state_name(state), dst_text, ctx_text, records_len, verdict,
	       reason);
	fflush(stdout);
	free(records);
	free(context);
	if (own >= 0)
		close(own);
	if (onward >= 0)
		close(onward);
}

/*
 * The service id registered for the service address. The layer answers on
 * a listening TCP socket only, and a service's address is the same for
 * both protocols: ask on one bound there for the question's sake.
 */
static int registered_id(uint32_t *id)
{
	int probe = socket(AF_INET, SOCK_STREAM, 0), rc, saved;

	if (probe < 0)
		return -errno;
	if (bind(probe, (struct sockaddr *)&service, sizeof(service)) < 0 || listen(probe, 1) < 0) {
		saved = errno;
		close(probe);
		errno = saved;
		return -saved;
	}
	rc = connredir_registered_service(probe, id);
	saved = errno;
	close(probe);
	errno = saved;
	return rc;
}

int main(int argc, char **argv)
{
	char ip[INET_ADDRSTRLEN], buf[65536];
	unsigned port;
	int shared, one = 1;

	service.sin_family = AF_INET;
	if (argc != 3 || sscanf(argv[2], "%15[0-9.]:%u", ip, &port) != 2 ||
	    inet_pton(AF_INET, ip, &service.sin_addr) != 1) {
		fprintf(stderr, "usage: %s NAME LISTEN_IPV4:PORT\n", argv[0]);
		return 2;
	}
	name = argv[1];
	service.sin_port = htons((uint16_t)port);
	if (registered_id(&self_id) < 0) {
		if (errno == EOPNOTSUPP)
			fprintf(stderr, "the connredir layer is not active for this process: is "
					"`connredir up` running, and is this process in its scope?\n");
		else if (errno == EADDRINUSE)
			fprintf(stderr, "cannot ask whether %s is a registered service: a TCP "
					"socket holds the address\n", argv[2]);
		else
			fprintf(stderr, "%s is not a registered connredir service: %s\n", argv[2],
				strerror(errno));
		return 2;
	}
	/* Both options: each flow's own socket binds the same address. */
	shared = socket(AF_INET, SOCK_DGRAM, 0);
	if (shared < 0 || setsockopt(shared, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(shared, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0 ||
	    bind(shared, (struct sockaddr *)&service, sizeof(service)) < 0) {
		perror("bind");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		struct sockaddr_in client;
		socklen_t client_len = sizeof(client);
		struct flow *known = NULL, *free_slot = NULL;
		ssize_t n = recvfrom(shared, buf, sizeof(buf), 0, (struct sockaddr *)&client,
				     &client_len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("recvfrom");
			return 1;
		}
		pthread_mutex_lock(&lock);
		for (int i = 0; i < MAX_FLOWS && !known; i++) {
			if (flows[i].used && same_client(&flows[i].client, &client))
				known = &flows[i];
			else if (!flows[i].used && !free_slot)
				free_slot = &flows[i];
		}
		if (known)
			send(known->onward, buf, (size_t)n, 0);
		else if (free_slot)
			open_flow(free_slot, &client, buf, (size_t)n);
		pthread_mutex_unlock(&lock);
	}
}
