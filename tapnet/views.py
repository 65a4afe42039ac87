"""`tapnet trace`, `capture`, `fdb`, `neigh` and `diagram`: watching a running instance.

Client side: each command talks to the daemon over the control socket
(`tapnet.control.request`). `trace` and `capture` subscribe with a filter
compiled by tcpdump (`tapnet.bpf`), poll every `POLL_INTERVAL` seconds and
unsubscribe when they end. A client that disappears without unsubscribing
is removed after `tapnet.watch.IDLE_TIMEOUT` seconds without a poll.

Daemon side: `handle_request` serves the requests below for
`tapnet.control.handle_request`. The instance's `Watch` is installed in the
TAP loop (`TapLoop.watch`), and in the UDP socket loop when that has the
same hook, only while a subscriber exists, so tracing off costs the
datapath one attribute test per batch.

| op | arguments | result |
|---|---|---|
| `trace-subscribe` | `kind` (`trace` or `capture`), `expression`, `program` (BPF rows or null for all) | `{"id": N}` |
| `trace-poll` | `id`, `max_bytes` | `{"items": [...], "dropped": N, "more": bool}` |
| `trace-unsubscribe` | `id` | `{"removed": bool}` |
| `trace-show` | `id` (a trace id) | the story |
| `fdb` | | rows like `bridge fdb show` |
| `neigh` | | rows like `ip neigh show` |
| `diagram` | `trace` (optional trace id) | `{"dot": "..."}` |
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time

from tapnet.control import DEFAULT_INSTANCE, ControlError, request

log = logging.getLogger(__name__)

# Seconds between polls while the daemon has nothing more: from the first value, doubled
# after each empty poll up to the second, so an idle client costs the daemon little.
POLL_INTERVAL = 0.1
POLL_INTERVAL_IDLE = 0.8

CONTROL_OPS = frozenset({"trace-subscribe", "trace-poll", "trace-unsubscribe", "trace-show", "fdb", "neigh", "diagram"})


# ---------------------------------------------------------------- daemon side

_watches: dict[str, object] = {}  # instance name -> its Watch, created on first use


def handle_request(instance, op: str, message: dict) -> object:
    """Serve one of CONTROL_OPS for the running `instance`; raises ValueError on a bad request."""
    import trio

    now = trio.current_time()
    if op == "fdb":
        return fdb_rows(instance.fabric, now)
    if op == "neigh":
        return neigh_rows(instance.fabric)
    if op == "diagram":
        from tapnet import diagram

        story = None
        if message.get("trace") is not None:
            story = _show(instance, _integer(message, "trace"))
        title = f"tapnet instance {instance.name}" + (f" ({instance.stack_label})" if instance.stack_label else "")
        return {"dot": diagram.cluster_dot(instance.cluster, title, story)}
    if op == "trace-show":
        return _show(instance, _integer(message, "id"))

    watch = _watch_of(instance)
    try:
        if op == "trace-subscribe":
            return _subscribe(watch, message, now)
        if op == "trace-poll":
            max_bytes = min(_integer(message, "max_bytes", 4 << 20), 64 << 20)
            return watch.poll(_integer(message, "id"), now, max_bytes=max_bytes)
        if op == "trace-unsubscribe":
            return {"removed": watch.unsubscribe(_integer(message, "id"))}
    finally:
        _install(instance, watch if watch.active else None)
    raise ValueError(f"unknown request {op!r}")


def _install(instance, watch) -> None:
    """Hand `watch` to every loop that runs the datapath (None: tracing off).

    The TAP loop always has the hook. The loop of the nodes' UDP sockets
    (VTEP, DNS upstream) gets the watch too when it has a `watch` attribute.
    Without that attribute, frames read from those sockets are not watched.
    """
    instance.loop.watch = watch
    sockets = getattr(instance, "sockets", None)
    if sockets is not None and hasattr(sockets, "watch"):
        sockets.watch = watch


def _watch_of(instance):
    from tapnet.watch import Watch

    if not hasattr(instance.loop, "watch"):
        raise ValueError("this daemon's TAP loop has no trace hook (TapLoop.watch); trace and capture are unavailable")
    watch = _watches.get(instance.name)
    if watch is None or watch.fabric is not instance.fabric:
        watch = _watches[instance.name] = Watch(instance.fabric)
        # A client that stops polling is removed inside the loop's batch; tracing then goes off at once.
        watch.on_empty = lambda: _install(instance, None)
    return watch


def _subscribe(watch, message: dict, now: float) -> dict:
    import trio

    from tapnet.bpf import MATCH_ALL, Filter, check_program

    kind = str(message.get("kind", ""))
    expression = str(message.get("expression") or "")
    program = message.get("program")
    if program is None:
        if expression.strip():
            raise ValueError(f"filter {expression!r} came without its BPF program")
        flt = MATCH_ALL
    else:
        flt = Filter(expression, check_program(program))
    # The datapath's `now` is trio's clock; captures and stories show wall-clock time.
    watch.wall_offset = time.time() - trio.current_time()
    subscriber = watch.subscribe(kind, flt, now)
    return {"id": subscriber.id, "kind": kind, "expression": expression}


def _show(instance, trace_id: int) -> dict:
    watch = _watches.get(instance.name)
    story = watch.show(trace_id) if watch is not None else None
    if story is None:
        raise ValueError(
            f"no trace {trace_id} in instance {instance.name!r}: the daemon keeps the most recent stories "
            "of running traces and captures only"
        )
    return story


def _integer(message: dict, key: str, default: int | None = None) -> int:
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid request: {key!r} must be an integer, got {value!r}")
    return value


def fdb_rows(fabric, now: float) -> list[dict]:
    """Collect the MAC tables of every node: learned entries, then the static entries of remote endpoints.

    Remote entries come from cluster state, as the Linux VXLAN FDB entries
    Docker's overlay driver installs: the MAC lives behind the node's VTEP
    port and is sent to `dst` with VNI `vni`.
    """
    from tapnet.model import format_mac

    rows = []
    for row in fabric.fdb(now):
        rows.append({**row, "dst": None, "vni": None})
    for node, dp in fabric.nodes.items():
        for network, peers in dp.peers.by_network.items():
            for mac, vtep in sorted(peers.mac_to_vtep.items()):
                rows.append(
                    {
                        "mac": format_mac(mac.to_bytes(6, "big")),
                        "port": f"{node}/vxlan",
                        "network": network,
                        "node": node,
                        "age": None,
                        "static": True,
                        "dst": _ip_text(vtep),
                        "vni": peers.vni,
                    }
                )
    return rows


def neigh_rows(fabric) -> list[dict]:
    """List every address the datapath sends ARP replies for, per node and network.

    Roles: `gateway` (the network's `.1`), `vip` (a service VIP),
    `ingress-sbox` (the routing mesh's address on the ingress network) and
    `remote` (an endpoint on another node or an external peer). ARP requests
    for a remote endpoint get their reply from the datapath (ARP
    suppression), and `vtep` names the VTEP behind which it lives.
    """
    from tapnet.model import format_mac

    cluster = fabric.cluster
    vip_services = {}
    for service in cluster.services.values():
        for network, vip in service.vips.items():
            vip_services[(network, int(vip))] = service.name
    ingress_sbox = {int(ip) for ip in cluster.ingress_sbox_ips.values()}

    rows = []
    for node, dp in fabric.nodes.items():
        for name, view in dp.networks.items():
            entries = [(view.gateway_ip, view.gateway_mac, "gateway", None)]
            for ip, mac in sorted(getattr(view, "arp_table", {}).items()):
                service = vip_services.get((name, ip))
                if service is not None:
                    entries.append((ip, mac, "vip", service))
                elif ip in ingress_sbox:
                    entries.append((ip, mac, "ingress-sbox", None))
                else:
                    entries.append((ip, mac, "service", None))
            peers = dp.peers.by_network.get(name)
            if peers is not None:
                for ip, mac in sorted(peers.ip_to_mac.items()):
                    entries.append((ip, mac, "remote", _ip_text(peers.mac_to_vtep[mac]) if mac in peers.mac_to_vtep else None))
            for ip, mac, role, extra in entries:
                rows.append(
                    {
                        "ip": _ip_text(ip),
                        "dev": f"{node}/{name}",
                        "lladdr": format_mac(mac.to_bytes(6, "big")),
                        "state": "PERMANENT",
                        "node": node,
                        "network": name,
                        "role": role,
                        "vtep": extra if role == "remote" else None,
                        "service": extra if role == "vip" else None,
                    }
                )
    return rows


def _ip_text(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}.{value & 0xFF}"


# ---------------------------------------------------------------- text forms


def format_fdb(rows: list[dict]) -> str:
    """Lines shaped like `bridge -s fdb show`; `used` is seconds since the MAC was last seen."""
    lines = []
    for row in rows:
        if row["dst"] is not None:
            lines.append(f"{row['mac']} dev {row['port']} dst {row['dst']} vni {row['vni']} master {row['network']} self permanent")
            continue
        line = f"{row['mac']} dev {row['port']} master {row['network']}"
        if row["static"]:
            line += " static"
        elif row["age"] is not None:
            line += f" used {int(row['age'])}"
        lines.append(line)
    return "\n".join(lines)


def format_neigh(rows: list[dict]) -> str:
    """Lines shaped like `ip neigh show`, with the role of each entry at the end."""
    lines = []
    for row in rows:
        line = f"{row['ip']} dev {row['dev']} lladdr {row['lladdr']}"
        if row["role"] == "gateway":
            line += " router"
        line += f" {row['state']}  {row['role']}"
        if row["vtep"]:
            line += f" vtep {row['vtep']}"
        if row["service"]:
            line += f" service {row['service']}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def _fail(message: str, status: int = 1) -> int:
    print(f"tapnet: {message}", file=sys.stderr)
    return status


def _compile(words: list[str]):
    from tapnet.bpf import FilterError, compile_filter

    try:
        return compile_filter(" ".join(words))
    except FilterError as error:
        raise ValueError(str(error)) from None


def cmd_trace(args: argparse.Namespace) -> int:
    from tapnet.watch import format_story

    try:
        if args.show is not None:
            story = request(args.instance, "trace-show", id=args.show)
            print(json.dumps(story) if args.json else format_story(story))
            return 0
        if args.diagram is not None:
            return _draw(args.instance, args.output, trace=args.diagram)
        flt = _compile(args.filter)
    except (ControlError, ValueError) as error:
        return _fail(str(error))

    return _follow(args, flt, format_story)


def _follow(args: argparse.Namespace, flt, format_story) -> int:
    """Print stories as they complete until -c, --duration, SIGINT or SIGTERM."""
    from tapnet.capture import stop_on_signals

    try:
        subscription = request(args.instance, "trace-subscribe", kind="trace", expression=flt.expression, program=flt.to_rows())
    except ControlError as error:
        return _fail(str(error))
    subscriber = subscription["id"]
    if not args.json:
        print(f"tapnet: tracing instance {args.instance!r}, filter {flt.expression or '(all frames)'!r}; Ctrl-C ends", file=sys.stderr, flush=True)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    shown = dropped = 0
    status = 0
    interval = POLL_INTERVAL
    with stop_on_signals() as stopped:
        try:
            while not stopped() and (args.count is None or shown < args.count):
                response = request(args.instance, "trace-poll", id=subscriber)
                for story in response["items"]:
                    if args.count is not None and shown >= args.count:
                        break
                    print(json.dumps(story) if args.json else format_story(story))
                    shown += 1
                sys.stdout.flush()
                if response["dropped"]:
                    dropped += response["dropped"]
                    print(f"tapnet: {response['dropped']} trace records dropped: the queue of this client was full", file=sys.stderr, flush=True)
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if response["items"]:
                    interval = POLL_INTERVAL
                if not response["more"]:
                    pause = interval
                    if deadline is not None:
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    time.sleep(pause)
                    interval = min(interval * 2, POLL_INTERVAL_IDLE)
        except ControlError as error:
            status = _fail(str(error))
        except BrokenPipeError:
            pass  # the reader of our output went away (`tapnet trace | head`)
        finally:
            try:
                request(args.instance, "trace-unsubscribe", id=subscriber)
            except ControlError:
                pass
    print(f"tapnet: {shown} traces" + (f", {dropped} dropped" if dropped else ""), file=sys.stderr)
    return status


def cmd_capture(args: argparse.Namespace) -> int:
    from tapnet.capture import run_capture

    try:
        flt = _compile(args.filter)
    except ValueError as error:
        return _fail(str(error))

    def report(message: str) -> None:
        print(f"tapnet: {message}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as files:

        def open_stream():
            if args.write == "-":
                return sys.stdout.buffer
            return files.enter_context(open(args.write, "wb"))

        try:
            run_capture(args.instance, flt, open_stream, args.count, args.duration, report)
        except ControlError as error:
            return _fail(str(error))
        except OSError as error:
            return _fail(f"writing {args.write} failed: {error}")
    return 0


def cmd_fdb(args: argparse.Namespace) -> int:
    try:
        rows = request(args.instance, "fdb")
    except ControlError as error:
        return _fail(str(error))
    rows = [r for r in rows if _selected(r, args)]
    print(json.dumps(rows, indent=2) if args.json else format_fdb(rows))
    return 0


def cmd_neigh(args: argparse.Namespace) -> int:
    try:
        rows = request(args.instance, "neigh")
    except ControlError as error:
        return _fail(str(error))
    rows = [r for r in rows if _selected(r, args)]
    print(json.dumps(rows, indent=2) if args.json else format_neigh(rows))
    return 0


def _selected(row: dict, args: argparse.Namespace) -> bool:
    return (args.node is None or row["node"] == args.node) and (args.network is None or row["network"] == args.network)


def cmd_diagram(args: argparse.Namespace) -> int:
    from tapnet import diagram

    if args.stack is None:
        try:
            return _draw(args.instance, args.output)
        except ControlError as error:
            return _fail(str(error))

    from tapnet import stack as stack_module
    from tapnet.control import _load_cluster

    try:
        cluster, label = _load_cluster(args.stack)
    except (stack_module.StackError, ValueError, OSError) as error:
        return _fail(f"invalid stack: {error}")
    return _output(diagram.cluster_dot(cluster, f"tapnet stack {label}"), args.output)


def _draw(instance: str, output: str | None, trace: int | None = None) -> int:
    source = request(instance, "diagram", trace=trace)["dot"]
    return _output(source, output)


def _output(source: str, output: str | None) -> int:
    from tapnet import diagram

    if output is None:
        sys.stdout.write(source)
        return 0
    try:
        path = diagram.render(source, output)
    except (diagram.DiagramError, OSError) as error:
        return _fail(str(error))
    print(f"tapnet: diagram written to {path}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--instance", default=DEFAULT_INSTANCE, metavar="NAME", help=f"instance name (default {DEFAULT_INSTANCE!r})")
        parser.set_defaults(func=func)
        return parser

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"invalid count {text}: must be at least 1")
        return value

    def seconds(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"invalid duration {text}: must be a positive number of seconds")
        return value

    trace = add(
        "trace",
        cmd_trace,
        "Print the story of each matching frame: where it entered, each stage's decision across nodes, the verdict.",
    )
    trace.add_argument("filter", nargs="*", metavar="FILTER", help="pcap-filter expression, as for tcpdump (default: every frame); VXLAN frames match on their inner frame")
    trace.add_argument("--json", action="store_true", help="print one JSON object per story and line")
    trace.add_argument("-c", dest="count", type=positive, metavar="COUNT", help="stop after COUNT stories")
    trace.add_argument("--duration", type=seconds, metavar="SECONDS", help="stop after SECONDS seconds")
    trace.add_argument("--show", type=int, metavar="ID", help="print the story with trace id ID, kept by the daemon from earlier traces and captures")
    trace.add_argument("--diagram", type=int, metavar="ID", help="draw the path of trace ID on the cluster diagram (with -o)")
    trace.add_argument("-o", dest="output", metavar="FILE", help="with --diagram: write .svg, .png, .pdf or .dot (default: DOT source on stdout)")

    capture = add(
        "capture",
        cmd_capture,
        "Record every matching frame where it enters and leaves tapnet, as pcapng with one interface per port.",
    )
    capture.add_argument("filter", nargs="*", metavar="FILTER", help="pcap-filter expression, as for tcpdump (default: every frame); VXLAN frames match on their inner frame")
    capture.add_argument("-w", dest="write", required=True, metavar="FILE.pcapng", help="file to write, or - for stdout")
    capture.add_argument("-c", dest="count", type=positive, metavar="COUNT", help="stop after COUNT frames")
    capture.add_argument("--duration", type=seconds, metavar="SECONDS", help="stop after SECONDS seconds")

    fdb = add("fdb", cmd_fdb, "Print the MAC tables of every node, shaped like `bridge fdb show`.")
    neigh = add("neigh", cmd_neigh, "Print the addresses the datapath answers ARP for, shaped like `ip neigh show`.")
    for parser in (fdb, neigh):
        parser.add_argument("--node", metavar="NODE", help="only this node")
        parser.add_argument("--network", metavar="NETWORK", help="only this network")
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")

    diagram = add("diagram", cmd_diagram, "Draw the running instance, or a stack file, with Graphviz like libnetwork's diagrams.")
    diagram.add_argument("stack", nargs="?", metavar="STACK", help="draw this stack file instead of the running instance")
    diagram.add_argument("-o", dest="output", metavar="FILE", help="write .svg, .png, .pdf or .dot (default: DOT source on stdout)")
