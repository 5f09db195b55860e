#!/usr/bin/env python3
"""A small inspecting UDP service on the connredir package: one thread per
flow.

For each new client seen on its socket bound to the service address, it
opens a socket of its own for that client (bound to the same address,
connected to the client), reads the flow's records, redirect context and
original destination there as on an accepted TCP connection, opens the
onward socket with the records set, and relays datagrams both ways until the
flow has been idle for 10 seconds. It prints one JSON line per flow when it
opens it: the chain of services, the client, the original destination.

    python3 udp_service.py --name resolver-guard --listen 127.0.0.1:15053

Run it in the cgroup of a registered service (see the README); it prints
"service N" when the layer knows its address as service N, then "ready".
"""

import argparse
import json
import select
import socket
import sys
import threading

import connredir

#: A flow ends after this long without a datagram either way, in seconds.
IDLE = 10.0

_print_lock = threading.Lock()


def say(line: str) -> None:
    """One line on stdout, whole, at once."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def relay(flow: socket.socket, onward: socket.socket, done) -> None:
    """Copies datagrams both ways until neither side sends for IDLE."""
    other = {flow.fileno(): onward, onward.fileno(): flow}
    own = {flow.fileno(): flow, onward.fileno(): onward}
    try:
        while True:
            ready, _, _ = select.select(list(own.values()), [], [], IDLE)
            if not ready:
                break
            for sock in ready:
                try:
                    other[sock.fileno()].send(sock.recv(65536))
                except ConnectionRefusedError:
                    # An earlier datagram met no socket: go on.
                    pass
    except OSError:
        pass
    finally:
        done()
        flow.close()
        onward.close()


def open_flow(service, client, name: str, service_id):
    """The flow's own socket and its onward socket, and its log line."""
    entry = {
        "proxy": name,
        "peer": ("[%s]:%d" if ":" in client[0] else "%s:%d") % client[:2],
        "client": None,
        "original_dst": None,
        "chain": [],
        "context": None,
        "state": connredir.RedirectState.NOT_REDIRECTED.value,
        "verdict": "allow",
        "reason": None,
    }
    flow = onward = None
    try:
        flow = connredir.udp_flow(service, client)
        # From here on the flow's socket answers as an accepted connection.
        try:
            records = connredir.query_records(flow)
        except connredir.NotRedirected:
            records = None
        if records is not None:
            entry["chain"] = list(records.chain)
            c = records.client
            entry["client"] = {"pid": c.pid, "uid": c.uid, "command": c.command}
            if service_id is not None:
                entry["state"] = records.state_for(service_id).value
            try:
                decoded = connredir.query_context(flow).original_addresses()
                entry["context"] = str(decoded[0]) if decoded else None
            except connredir.AccessDenied:
                pass
        dst = connredir.original_destination(flow)
        entry["original_dst"] = str(dst)
        onward = connredir.udp_connect_onward(flow, dst)
        return flow, onward, entry
    except OSError as e:
        entry["verdict"] = "error"
        entry["reason"] = "%s: %s" % (type(e).__name__, e)
        for sock in (flow, onward):
            if sock is not None:
                sock.close()
        return None, None, entry
    finally:
        say(json.dumps(entry))


def registered_id(service: connredir.Endpoint):
    """The id of the service registered at `service`. The layer answers on a
    listening TCP socket only, and a service's address is the same for both
    protocols: ask on one bound there for the question's sake."""
    probe = socket.socket(service.family, socket.SOCK_STREAM)
    with probe:
        probe.bind(service.sockaddr)
        probe.listen(1)
        return connredir.registered_service(probe)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="python-udp", help="the name in the log lines")
    parser.add_argument("--listen", required=True, help="IP:PORT to receive on ([IPv6]:PORT)")
    args = parser.parse_args()

    service = connredir.Endpoint.parse(args.listen)
    try:
        service_id = registered_id(service)
        say("service %d" % service_id)
    except (connredir.ServiceError, OSError) as e:
        # Still useful outside the layer, as a plain forwarder it is not.
        service_id = None
        say("service none: %s" % e)
    shared = connredir.udp_bind(service)
    say("ready")
    # Onward sockets by client: datagrams that reached the shared socket
    # before the client's own socket existed go the same way.
    flows = {}
    lock = threading.Lock()
    while True:
        data, client = shared.recvfrom(65536)
        key = client[:2]
        with lock:
            onward = flows.get(key)
        if onward is not None:
            try:
                onward.send(data)
            except OSError:
                pass
            continue
        flow, onward, _ = open_flow(service, client, args.name, service_id)
        if flow is None:
            continue
        try:
            onward.send(data)
        except OSError:
            pass
        with lock:
            flows[key] = onward

        def done(key=key):
            with lock:
                flows.pop(key, None)

        threading.Thread(target=relay, args=(flow, onward, done), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
