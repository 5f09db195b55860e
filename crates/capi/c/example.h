/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What the C examples (proxy.c, udp_service.c) share: printing an address
 * and a redirect state, and reading a blob with the seeds' buffer protocol
 * (ask the size with an empty buffer, then read). Header-only, so that each
 * example still builds with one `cc` line.
 */
#ifndef CONNREDIR_EXAMPLE_H
#define CONNREDIR_EXAMPLE_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <connredir.h>

/* "ip:port" or "[ip]:port" of a sockaddr_in or sockaddr_in6, into out. */
static void format_addr(const struct sockaddr_storage *ss, char *out, size_t size)
{
	char ip[INET6_ADDRSTRLEN] = "?";

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *in = (const void *)ss;

		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(out, size, "%s:%u", ip, ntohs(in->sin_port));
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const void *)ss;

		inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
		snprintf(out, size, "[%s]:%u", ip, ntohs(in6->sin6_port));
	} else {
		snprintf(out, size, "unknown");
	}
}

static const char *state_name(enum connredir_redirect_state state)
{
	switch (state) {
	case CONNREDIR_NOT_REDIRECTED:
		return "not_redirected";
	case CONNREDIR_REDIRECTED_BY_SELF:
		return "redirected_by_self";
	case CONNREDIR_REDIRECTED_BY_OTHER:
		return "redirected_by_other";
	case CONNREDIR_PREVIOUSLY_REDIRECTED_BY_SELF:
		return "previously_redirected_by_self";
	}
	return "unknown";
}

/*
 * A blob read with the buffer protocol: the size first, then the blob.
 * NULL with *len 0 when the query failed (errno says why).
 */
static void *query(int fd, uint32_t code, uint32_t *len)
{
	uint32_t needed = 0;
	void *buf;

	*len = 0;
	if (connredir_ioctl(fd, code, NULL, 0, NULL, 0, &needed) < 0)
		return NULL;
	buf = malloc(needed);
	if (!buf)
		return NULL;
	if (connredir_ioctl(fd, code, NULL, 0, buf, needed, len) < 0) {
		free(buf);
		return NULL;
	}
	return buf;
}

#endif /* CONNREDIR_EXAMPLE_H */
