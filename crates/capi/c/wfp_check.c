/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The WFP control codes' buffer protocol and errors, asked the Windows way:
 * written as for Winsock (WSAIoctl, SOCKET_ERROR, WSAGetLastError, the
 * SIO_* codes), with <connredir/wfp.h> where <winsock2.h> and <mstcpip.h>
 * would be. One case per run; each call prints a JSON line:
 *
 *   {"call":"LABEL","rc":0|-1,"error":"ok|WSAE...","bytes":N}
 *
 *   wfp_check size|too-small|tiny LISTEN_IPV4:PORT
 *       as a service: listen, print `ready`, accept one redirected
 *       connection, ask about it, then echo what the client sends
 *   wfp_check context-denied LISTEN_IPV4:PORT CGROUP_PROCS
 *       as above, then ask again from a child process moved (by writing
 *       its pid to CGROUP_PROCS) out of the service's cgroup
 *   wfp_check not-connected|not-a-socket|not-supported|set|faults
 *       on sockets (and a pipe) of its own
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <connredir/wfp.h>

#define RECORDS SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS
#define CONTEXT SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT
#define SET SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS

static const char *error_name(int err)
{
	switch (err) {
	case WSAEFAULT:
		return "WSAEFAULT";
	case WSAEINVAL:
		return "WSAEINVAL";
	case WSAENOTCONN:
		return "WSAENOTCONN";
	case WSAENOTSOCK:
		return "WSAENOTSOCK";
	case WSAEOPNOTSUPP:
		return "WSAEOPNOTSUPP";
	case WSAEACCES:
		return "WSAEACCES";
	case ERROR_INSUFFICIENT_BUFFER:
		return "ERROR_INSUFFICIENT_BUFFER";
	case ENOENT:
		return "ENOENT";
	}
	return strerror(err);
}

/* One WSAIoctl call, reported. bytes_returned starts as garbage on
 * purpose: every answer must write it. */
static int call(const char *label, SOCKET s, DWORD code, LPVOID in, DWORD in_len, LPVOID out,
		DWORD out_len)
{
	DWORD returned = 0xdeadbeef;
	int rc = WSAIoctl(s, code, in, in_len, out, out_len, &returned, NULL, NULL);

	printf("{\"call\":\"%s\",\"rc\":%d,\"error\":\"%s\",\"bytes\":%u}\n", label, rc,
	       rc == SOCKET_ERROR ? error_name(WSAGetLastError()) : "ok", returned);
	fflush(stdout);
	return rc;
}

/* Listens on argv's address, says `ready`, accepts one connection. */
static SOCKET accept_one(const char *at)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	char ip[INET_ADDRSTRLEN];
	unsigned port;
	SOCKET listener, conn;

	if (!at || sscanf(at, "%15[0-9.]:%u", ip, &port) != 2 ||
	    inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
		fprintf(stderr, "wfp_check: a LISTEN_IPV4:PORT is needed\n");
		exit(2);
	}
	addr.sin_port = htons((uint16_t)port);
	listener = socket(AF_INET, SOCK_STREAM, 0);
	if (listener == INVALID_SOCKET || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) ||
	    listen(listener, 8)) {
		perror("wfp_check: listen");
		exit(1);
	}
	printf("ready\n");
	fflush(stdout);
	conn = accept(listener, NULL, NULL);
	if (conn == INVALID_SOCKET) {
		perror("wfp_check: accept");
		exit(1);
	}
	close(listener);
	return conn;
}

/* Sends back what the client sent, until its end: the client checks it. */
static void echo_back(SOCKET s)
{
	char data[4096];
	ssize_t n;

	while ((n = read(s, data, sizeof(data))) > 0)
		if (write(s, data, (size_t)n) != n)
			break;
	close(s);
}

/* A connection of its own on loopback: the accepted end. */
static SOCKET loopback_pair(SOCKET *client)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t len = sizeof(addr);
	SOCKET listener = socket(AF_INET, SOCK_STREAM, 0), conn;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	*client = socket(AF_INET, SOCK_STREAM, 0);
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) || listen(listener, 1) ||
	    getsockname(listener, (struct sockaddr *)&addr, &len) ||
	    connect(*client, (struct sockaddr *)&addr, sizeof(addr))) {
		perror("wfp_check: loopback connection");
		exit(1);
	}
	conn = accept(listener, NULL, NULL);
	close(listener);
	return conn;
}

/* A records blob made by hand (no hops): well formed, never issued. */
static void hand_made(struct connredir_record *record)
{
	memset(record, 0, sizeof(*record));
	record->magic = CONNREDIR_RECORD_MAGIC;
	record->version = CONNREDIR_RECORD_VERSION;
	record->size = sizeof(*record);
}

int main(int argc, char **argv)
{
	const char *which = argc > 1 ? argv[1] : "";
	const char *at = argc > 2 ? argv[2] : NULL;
	static unsigned char buf[4096];
	struct connredir_record record;
	DWORD needed = 0;

	if (!strcmp(which, "size")) {
		/* cbOutBuffer 0: the size needed, then a buffer of that size. */
		SOCKET s = accept_one(at);

		call("records-size", s, RECORDS, NULL, 0, NULL, 0);
		WSAIoctl(s, RECORDS, NULL, 0, NULL, 0, &needed, NULL, NULL);
		if (call("records-exact", s, RECORDS, NULL, 0, buf, needed) == 0) {
			memcpy(&record, buf, sizeof(record));
			printf("{\"call\":\"records-magic\",\"ok\":%s}\n",
			       record.magic == CONNREDIR_RECORD_MAGIC ? "true" : "false");
		}
		call("context-size", s, CONTEXT, NULL, 0, NULL, 0);
		WSAIoctl(s, CONTEXT, NULL, 0, NULL, 0, &needed, NULL, NULL);
		call("context-exact", s, CONTEXT, NULL, 0, buf, needed);
		echo_back(s);
	} else if (!strcmp(which, "too-small")) {
		/* At least a ULONG, but too small: the size needed comes back. */
		SOCKET s = accept_one(at);

		WSAIoctl(s, RECORDS, NULL, 0, NULL, 0, &needed, NULL, NULL);
		call("records-ulong", s, RECORDS, NULL, 0, buf, sizeof(ULONG));
		call("records-one-short", s, RECORDS, NULL, 0, buf, needed - 1);
		WSAIoctl(s, CONTEXT, NULL, 0, NULL, 0, &needed, NULL, NULL);
		call("context-ulong", s, CONTEXT, NULL, 0, buf, sizeof(ULONG));
		call("context-one-short", s, CONTEXT, NULL, 0, buf, needed - 1);
		echo_back(s);
	} else if (!strcmp(which, "tiny")) {
		/* "cbOutBuffer must be at least the size of a ULONG." */
		SOCKET s = accept_one(at);
		char label[32];

		for (DWORD len = 1; len < sizeof(ULONG); len++) {
			snprintf(label, sizeof(label), "records-%u", len);
			call(label, s, RECORDS, NULL, 0, buf, len);
			snprintf(label, sizeof(label), "context-%u", len);
			call(label, s, CONTEXT, NULL, 0, buf, len);
		}
		echo_back(s);
	} else if (!strcmp(which, "context-denied")) {
		/* The context is for the redirecting service only. */
		SOCKET s = accept_one(at);
		const char *procs = argc > 3 ? argv[3] : NULL;
		pid_t child;
		FILE *f;

		call("service-context", s, CONTEXT, NULL, 0, buf, sizeof(buf));
		fflush(stdout);
		child = fork();
		if (child == 0) {
			f = procs ? fopen(procs, "w") : NULL;
			if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f)) {
				perror("wfp_check: leave the service's cgroup");
				_exit(1);
			}
			call("other-context", s, CONTEXT, NULL, 0, buf, sizeof(buf));
			call("other-records", s, RECORDS, NULL, 0, buf, sizeof(buf));
			_exit(0);
		}
		waitpid(child, NULL, 0);
		call("service-context-again", s, CONTEXT, NULL, 0, buf, sizeof(buf));
		echo_back(s);
	} else if (!strcmp(which, "not-connected")) {
		SOCKET s = socket(AF_INET, SOCK_STREAM, 0);

		call("records", s, RECORDS, NULL, 0, buf, sizeof(buf));
		call("context", s, CONTEXT, NULL, 0, buf, sizeof(buf));
	} else if (!strcmp(which, "not-a-socket")) {
		int pipe_fds[2];

		if (pipe(pipe_fds))
			return 1;
		hand_made(&record);
		call("records", pipe_fds[0], RECORDS, NULL, 0, buf, sizeof(buf));
		call("context", pipe_fds[0], CONTEXT, NULL, 0, buf, sizeof(buf));
		call("set", pipe_fds[0], SET, &record, sizeof(record), NULL, 0);
		close(pipe_fds[1]);
		close(pipe_fds[0]);
		call("records-closed", pipe_fds[0], RECORDS, NULL, 0, buf, sizeof(buf));
	} else if (!strcmp(which, "not-supported")) {
		/* Where the layer does not cover the socket. */
		SOCKET client, s = loopback_pair(&client), fresh = socket(AF_INET, SOCK_STREAM, 0);

		hand_made(&record);
		call("records", s, RECORDS, NULL, 0, buf, sizeof(buf));
		call("context", s, CONTEXT, NULL, 0, buf, sizeof(buf));
		call("set", fresh, SET, &record, sizeof(record), NULL, 0);
	} else if (!strcmp(which, "set")) {
		/* A new socket, records set before connect. */
		SOCKET fresh = socket(AF_INET, SOCK_STREAM, 0);

		hand_made(&record);
		call("set", fresh, SET, &record, sizeof(record), NULL, 0);
	} else if (!strcmp(which, "faults")) {
		/* Pointers and arguments the calls cannot take. */
		SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
		int rc;

		hand_made(&record);
		rc = WSAIoctl(s, RECORDS, NULL, 0, buf, sizeof(buf), NULL, NULL, NULL);
		printf("{\"call\":\"no-bytes-returned\",\"rc\":%d,\"error\":\"%s\",\"bytes\":0}\n", rc,
		       rc ? error_name(WSAGetLastError()) : "ok");
		call("null-output", s, RECORDS, NULL, 0, NULL, sizeof(buf));
		call("null-input", s, SET, NULL, sizeof(record), NULL, 0);
		call("set-with-output", s, SET, &record, sizeof(record), buf, sizeof(ULONG));
		call("unknown-code", s, 0x980000DF, NULL, 0, buf, sizeof(buf));
	} else {
		fprintf(stderr, "wfp_check: unknown case %s\n", which);
		return 2;
	}
	return 0;
}
