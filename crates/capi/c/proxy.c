/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * A redirect service in C on libconnredir, thread per connection: accept,
 * read the redirect records and context, connect onward with the records
 * set, relay both ways, and print one JSON line per connection on stdout.
 *
 *   cc -o proxy proxy.c $(pkg-config --cflags --libs connredir) -pthread
 *   proxy NAME LISTEN_IPV4:PORT
 *
 * It prints `ready` once it listens at a registered service's address, and
 * exits with 2 when the address is not one.
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

static const char *name;
static uint32_t self_id;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

/* Moves bytes both ways until both sides have closed; counts them. */
static void relay(int client, int server, unsigned long long *up, unsigned long long *down)
{
	struct pollfd fds[2] = { { .fd = client, .events = POLLIN },
				 { .fd = server, .events = POLLIN } };
	int open_dirs = 2;
	char buf[65536];

	while (open_dirs > 0) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		for (int i = 0; i < 2; i++) {
			int from = i == 0 ? client : server, to = i == 0 ? server : client;
			ssize_t n;

			if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			n = read(from, buf, sizeof(buf));
			if (n < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (n <= 0) {
				/* This direction ended: pass the half-close on. */
				shutdown(to, SHUT_WR);
				fds[i].fd = -1;
				open_dirs--;
				if (n < 0)
					return;
				continue;
			}
			for (ssize_t done = 0; done < n;) {
				ssize_t w = write(to, buf + done, (size_t)(n - done));

				if (w < 0 && errno == EINTR)
					continue;
				if (w <= 0)
					return;
				done += w;
			}
			*(i == 0 ? up : down) += (unsigned long long)n;
		}
	}
}

static void *handle(void *arg)
{
	int client = (int)(intptr_t)arg, onward = -1;
	uint32_t records_len = 0, context_len = 0, ignored;
	void *records, *context;
	struct connredir_record parsed;
	enum connredir_redirect_state state = CONNREDIR_NOT_REDIRECTED;
	struct sockaddr_storage dst, ctx_dst, ctx_local;
	socklen_t dst_len = sizeof(dst), ctx_dst_len = sizeof(ctx_dst),
		  ctx_local_len = sizeof(ctx_local);
	char dst_text[64] = "unknown", ctx_text[64] = "null", chain[128] = "";
	unsigned long long up = 0, down = 0;
	const char *verdict = "allow", *reason = "null";

	/* Not redirected (ENOENT): no records to hand on. */
	records = query(client, CONNREDIR_SIO_QUERY_RECORDS, &records_len);
	if (records && connredir_records_parse(records, records_len, &parsed) == 0) {
		size_t at = 0;

		for (uint16_t i = 0; i < parsed.hop_count && at < sizeof(chain); i++)
			at += (size_t)snprintf(chain + at, sizeof(chain) - at, "%s%u", i ? "," : "",
					       parsed.hops[i].service_id);
	}
	connredir_redirect_state(records, records_len, self_id, &state);

	/* The default context holds the original destination too. */
	context = query(client, CONNREDIR_SIO_QUERY_CONTEXT, &context_len);
	if (context && connredir_context_addresses(context, context_len, (struct sockaddr *)&ctx_dst,
						   &ctx_dst_len, (struct sockaddr *)&ctx_local,
						   &ctx_local_len) == 0) {
		ctx_text[0] = '"';
		format_addr(&ctx_dst, ctx_text + 1, sizeof(ctx_text) - 2);
		strcat(ctx_text, "\"");
	}

	if (connredir_original_destination(client, (struct sockaddr *)&dst, &dst_len) < 0) {
		verdict = "error";
		reason = "\"no original destination\"";
		goto out;
	}
	format_addr(&dst, dst_text, sizeof(dst_text));
	onward = socket(dst.ss_family, SOCK_STREAM, 0);
	if (onward < 0 ||
	    (records && connredir_ioctl(onward, CONNREDIR_SIO_SET_RECORDS, records, records_len,
					NULL, 0, &ignored) < 0) ||
	    connect(onward, (struct sockaddr *)&dst, dst_len) < 0) {
		verdict = "error";
		reason = "\"could not connect onward\"";
		goto out;
	}
	relay(client, onward, &up, &down);
out:
	pthread_mutex_lock(&log_lock);
	printf("{\"proxy\":\"%s\",\"chain\":[%s],\"state\":\"%s\",\"original_dst\":\"%s\","
	       "\"context_dst\":%s,\"records_bytes\":%u,\"bytes_up\":%llu,\"bytes_down\":%llu,"
	       "\"verdict\":\"%s\",\"reason\":%s}\n",
	       name, chain, state_name(state), dst_text, ctx_text, records_len, up, down, verdict,
	       reason);
	fflush(stdout);
	pthread_mutex_unlock(&log_lock);
	free(records);
	free(context);
	if (onward >= 0)
		close(onward);
	close(client);
	return NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	char ip[INET_ADDRSTRLEN];
	unsigned port;
	int listener, one = 1;

	if (argc != 3 || sscanf(argv[2], "%15[0-9.]:%u", ip, &port) != 2 ||
	    inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
		fprintf(stderr, "usage: %s NAME LISTEN_IPV4:PORT\n", argv[0]);
		return 2;
	}
	name = argv[1];
	addr.sin_port = htons((uint16_t)port);
	listener = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(listener, 128) < 0) {
		perror("listen");
		return 1;
	}
	if (connredir_registered_service(listener, &self_id) < 0) {
		if (errno == EOPNOTSUPP)
			fprintf(stderr, "the connredir layer is not active for this process: is "
					"`connredir up` running, and is this process in its scope?\n");
		else
			fprintf(stderr, "%s is not a registered connredir service: %s\n", argv[2],
				strerror(errno));
		return 2;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		pthread_t thread;
		int client = accept(listener, NULL, NULL);

		if (client < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("accept");
			return 1;
		}
		if (pthread_create(&thread, NULL, handle, (void *)(intptr_t)client) != 0) {
			close(client);
			continue;
		}
		pthread_detach(thread);
	}
}
