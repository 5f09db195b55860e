#!/usr/bin/env python3
"""A small inspecting TCP proxy on the connredir package: one thread per
connection (and one more per direction).

For each connection the layer redirects to it: accept, read the records and
the original destination, open the onward socket, hand it the records,
connect, and relay both ways. When the connection ends it prints one JSON
line: the chain of services, the flow id, the client, the redirect context,
the bytes each way.

    python3 proxy.py --name inspector --listen 127.0.0.1:15001

Run it in the cgroup of a registered service (see the README); it prints
"service N" when the layer knows its listener as service N, then "ready".
"""

import argparse
import json
import socket
import sys
import threading
import time

import connredir

_print_lock = threading.Lock()


def say(line: str) -> None:
    """One line on stdout, whole, at once."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def relay(source: socket.socket, sink: socket.socket, counts: dict, key: str) -> None:
    """Copies `source` to `sink` until EOF, then half-closes `sink`."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
            counts[key] += len(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client: socket.socket, peer, name: str, service_id) -> None:
    """One accepted connection, from accept to the log line."""
    started = time.monotonic()
    entry = {
        "proxy": name,
        "peer": ("[%s]:%d" if client.family == socket.AF_INET6 else "%s:%d") % peer[:2],
        "flow": None,
        "client": None,
        "original_dst": None,
        "chain": [],
        "context": None,
        "state": connredir.RedirectState.NOT_REDIRECTED.value,
        "bytes_up": 0,
        "bytes_down": 0,
        "verdict": "allow",
        "reason": None,
    }
    counts = {"up": 0, "down": 0}
    onward = None
    try:
        try:
            records = connredir.query_records(client)
        except connredir.NotRedirected:
            records = None
        if records is not None:
            entry["chain"] = list(records.chain)
            entry["flow"] = str(records.flow) if records.flow else None
            c = records.client
            entry["client"] = {
                "pid": c.pid,
                "uid": c.uid,
                "cgroup_id": c.cgroup_id,
                "command": c.command,
            }
            if service_id is not None:
                entry["state"] = records.state_for(service_id).value
            try:
                # The default context is the original destination (and the
                # local address); a service's own context is its bytes.
                context = connredir.query_context(client)
                decoded = context.original_addresses()
                entry["context"] = str(decoded[0]) if decoded else len(context.data)
            except connredir.AccessDenied:
                pass
        try:
            dst = connredir.original_destination(client)
        except OSError:
            if records is None or records.original_destination is None:
                raise
            dst = records.original_destination
        entry["original_dst"] = str(dst)
        onward = socket.socket(dst.family, socket.SOCK_STREAM)
        if records is not None:
            # Before connect: the layer sends the onward connection to the
            # next service of the chain, or to the destination.
            connredir.set_records(onward, records)
        onward.connect(dst.sockaddr)
        up = threading.Thread(target=relay, args=(client, onward, counts, "up"), daemon=True)
        up.start()
        relay(onward, client, counts, "down")
        up.join()
    except OSError as e:
        entry["verdict"] = "error"
        entry["reason"] = "%s: %s" % (type(e).__name__, e)
    finally:
        for s in (client, onward):
            if s is not None:
                s.close()
        entry["bytes_up"] = counts["up"]
        entry["bytes_down"] = counts["down"]
        entry["duration_ms"] = int((time.monotonic() - started) * 1000)
        say(json.dumps(entry))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="python-proxy", help="the name in the log lines")
    parser.add_argument("--listen", required=True, help="IP:PORT to listen on ([IPv6]:PORT)")
    args = parser.parse_args()

    at = connredir.Endpoint.parse(args.listen)
    listener = socket.socket(at.family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(at.sockaddr)
    listener.listen(128)
    try:
        service_id = connredir.registered_service(listener)
        say("service %d" % service_id)
    except connredir.ServiceError as e:
        # Still useful outside the layer (a plain transparent proxy).
        service_id = None
        say("service none: %s" % e)
    say("ready")
    while True:
        client, peer = listener.accept()
        threading.Thread(
            target=handle, args=(client, peer, args.name, service_id), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
