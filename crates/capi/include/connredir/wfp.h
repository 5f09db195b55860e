/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The Windows names of connredir's WFP connection-redirect calls, for a
 * redirect service ported from Windows: replace
 *
 *     #include <winsock2.h>
 *     #include <mstcpip.h>
 *
 * with the POSIX socket headers and
 *
 *     #include <connredir/wfp.h>
 *
 * and the calls stay as they are:
 *
 *     if (WSAIoctl(s, SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, NULL, 0,
 *                  NULL, 0, &needed, NULL, NULL) == SOCKET_ERROR) ...
 *     if (WSAGetLastError() == ERROR_INSUFFICIENT_BUFFER) ...
 *
 * WSAIoctl here is connredir_ioctl (see <connredir.h> for the buffer
 * protocol) for the three SIO_*_WFP_CONNECTION_REDIRECT_* codes; any other
 * code is WSAEINVAL. A Linux socket has no overlapped attribute, so, as the
 * pages say for such sockets, lpOverlapped and lpCompletionRoutine are
 * ignored and the call completes before it returns (WSA_IO_PENDING and
 * WSA_OPERATION_ABORTED never happen).
 *
 * Errors: WSAGetLastError() is errno, and each WSAE* code the pages name is
 * the errno value that means it on Linux (so strerror() describes it):
 *
 *   WSAEFAULT      EFAULT        WSAENOTCONN    ENOTCONN
 *   WSAEINVAL      EINVAL        WSAENOTSOCK    ENOTSOCK
 *   WSAEOPNOTSUPP  EOPNOTSUPP    WSAEACCES      EACCES
 *   WSAENOPROTOOPT ENOPROTOOPT   WSAEINTR       EINTR
 *   WSAEINPROGRESS EINPROGRESS   WSAENETDOWN    ENETDOWN
 *   ERROR_INSUFFICIENT_BUFFER    ENOBUFS
 *
 * and connredir's own: ENOENT, the connection was not redirected.
 *
 * The Windows types are defined unless CONNREDIR_WFP_NO_WIN_TYPES is
 * defined first, for a program whose own compatibility header defines
 * SOCKET, DWORD, LPDWORD, LPVOID, LPWSAOVERLAPPED and
 * LPWSAOVERLAPPED_COMPLETION_ROUTINE.
 */
#ifndef CONNREDIR_WFP_H
#define CONNREDIR_WFP_H

#include <errno.h>
#include <stdint.h>

#include <connredir.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- The control codes (mstcpip.h). */

#define SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS CONNREDIR_SIO_QUERY_RECORDS
#define SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT CONNREDIR_SIO_QUERY_CONTEXT
#define SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS CONNREDIR_SIO_SET_RECORDS

/* ---- The errors, as errno values. */

#define WSAEFAULT EFAULT
#define WSAEINVAL EINVAL
#define WSAENOTCONN ENOTCONN
#define WSAENOTSOCK ENOTSOCK
#define WSAEOPNOTSUPP EOPNOTSUPP
#define WSAEACCES EACCES
#define WSAENOPROTOOPT ENOPROTOOPT
#define WSAEINTR EINTR
#define WSAEINPROGRESS EINPROGRESS
#define WSAENETDOWN ENETDOWN
#define ERROR_INSUFFICIENT_BUFFER ENOBUFS

#ifndef CONNREDIR_WFP_NO_WIN_TYPES
/* ---- The Windows types the calls use (Windows' ULONG and DWORD are 32 bits). */

typedef int SOCKET;
typedef uint32_t DWORD;
typedef uint32_t ULONG;
typedef DWORD *LPDWORD;
typedef void *LPVOID;
/* Never used here: a Linux socket is not overlapped. */
typedef struct _WSAOVERLAPPED WSAOVERLAPPED, *LPWSAOVERLAPPED;
typedef void (*LPWSAOVERLAPPED_COMPLETION_ROUTINE)(DWORD dwError, DWORD cbTransferred,
						   LPWSAOVERLAPPED lpOverlapped, DWORD dwFlags);

#define INVALID_SOCKET (-1)
#define SOCKET_ERROR (-1)
#endif

/* The error of the last failed call on this thread. */
static inline int WSAGetLastError(void)
{
	return errno;
}

/*
 * WSAIoctl for the WFP connection-redirect control codes: 0 on success,
 * SOCKET_ERROR with WSAGetLastError() on failure.
 */
static inline int WSAIoctl(SOCKET s, DWORD dwIoControlCode, LPVOID lpvInBuffer, DWORD cbInBuffer,
			   LPVOID lpvOutBuffer, DWORD cbOutBuffer, LPDWORD lpcbBytesReturned,
			   LPWSAOVERLAPPED lpOverlapped,
			   LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine)
{
	(void)lpOverlapped;
	(void)lpCompletionRoutine;
	return connredir_ioctl(s, dwIoControlCode, lpvInBuffer, cbInBuffer, lpvOutBuffer,
			       cbOutBuffer, lpcbBytesReturned) == 0 ?
		       0 :
		       -1 /* SOCKET_ERROR */;
}

#ifdef __cplusplus
}
#endif

#endif /* CONNREDIR_WFP_H */
