"""CLI subcommands of a running instance, and the control socket they talk over.

`tapnet start` runs the daemon, in the foreground or, with `--detach`, in the
background. `ps`, `inspect`, `stats`, `exec` and `stop` send requests to it
over the Unix socket `/run/tapnet/<instance>/control.sock`.

Protocol: the client connects, sends one request as a JSON object on one line
(`{"op": "ps"}`, `{"op": "inspect", "name": "front"}`), and reads one response
line: `{"ok": true, "result": ...}` or `{"ok": false, "error": "message"}`.
The daemon then closes the connection. Requests are limited to
`MAX_REQUEST` bytes and `REQUEST_TIMEOUT` seconds.

Client commands import neither pyroute2 nor numba, so they start quickly;
scapy is never imported here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_INSTANCE = "default"
MAX_REQUEST = 65536
REQUEST_TIMEOUT = 5.0  # seconds for one request on either side
# Seconds `start --detach` waits for the daemon's control socket (the first
# start compiles the numba parser, which takes a while on a slow machine).
DETACH_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0  # seconds `stop` waits for the daemon to finish its cleanup


class ControlError(Exception):
    """The daemon is unreachable or returned an error; the message is for the user."""


# ---------------------------------------------------------------- client side


def state_dir(instance: str) -> Path:
    return Path("/run/tapnet") / instance


def socket_path(instance: str) -> Path:
    return state_dir(instance) / "control.sock"


def request(instance: str, op: str, timeout: float = REQUEST_TIMEOUT, **arguments) -> object:
    """Send one request to the daemon of `instance` and return its result; raise ControlError."""
    path = socket_path(instance)
    message = json.dumps({"op": op, **arguments}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(message)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"instance {instance!r} is not running (no daemon at {path}); start it with `tapnet start --instance {instance}`") from None
    except socket.timeout:
        raise ControlError(f"instance {instance!r} did not respond to {op!r} within {timeout:g} s (timed out)") from None
    except OSError as error:
        raise ControlError(f"talking to instance {instance!r} at {path} failed: {error}") from None
    try:
        response = json.loads(data)
    except json.JSONDecodeError:
        raise ControlError(f"instance {instance!r} sent an invalid response to {op!r}: {data[:200]!r}") from None
    if not response.get("ok"):
        raise ControlError(response.get("error", f"request {op!r} failed"))
    return response.get("result")


# ---------------------------------------------------------------- daemon side


async def serve_control(instance, *, task_status=None) -> None:
    """Accept control requests for `instance` until cancelled (run by the daemon's nursery)."""
    import trio

    path = socket_path(instance.name)
    path.unlink(missing_ok=True)  # the instance lock is held, so an existing socket is stale
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        if task_status is not None:
            task_status.started()
        await trio.serve_listeners(lambda stream: _serve_connection(instance, stream), [trio.SocketListener(sock)])
    finally:
        path.unlink(missing_ok=True)


async def _serve_connection(instance, stream) -> None:
    import trio

    data = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk

    try:
        response = {"ok": True, "result": handle_request(instance, json.loads(data))}
    except json.JSONDecodeError:
        response = {"ok": False, "error": "invalid request: expected one JSON object on one line"}
    except (KeyError, ValueError, TypeError) as error:
        response = {"ok": False, "error": str(error.args[0]) if error.args else repr(error)}
    except Exception as error:  # a bad request must never stop the daemon
        log.exception("control request failed")
        response = {"ok": False, "error": f"internal error: {error}"}

    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(json.dumps(response).encode() + b"\n")
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away


def handle_request(instance, message: object) -> object:
    """Dispatch one decoded request to its view; raises ValueError on a bad request."""
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError('invalid request: expected an object with an "op" string')
    op = message["op"]
    if op == "ping":
        return {"instance": instance.name, "pid": os.getpid()}
    if op == "summary":
        return view_summary(instance)
    if op == "ps":
        return view_ps(instance)
    if op == "inspect":
        return view_inspect(instance, str(message.get("name", "")))
    if op == "stats":
        return instance.loop.counters()
    if op == "sandbox":
        name = str(message.get("name", ""))
        if name not in instance.namespaces:
            raise ValueError(f"no sandbox named {name!r} in instance {instance.name!r}; `tapnet ps` lists them")
        return {"name": name, "namespace": instance.namespaces[name]}
    if op == "stop":
        log.info("instance %s: stop requested over the control socket", instance.name)
        instance.stopping.set()
        return {"stopping": True}
    if op in SERVICE_OPS:
        return _handle_service_request(instance, op, message)
    from tapnet import views  # trace, capture, fdb, neigh and diagram

    if op in views.CONTROL_OPS:
        return views.handle_request(instance, op, message)
    raise ValueError(f"unknown request {op!r}")


SERVICE_OPS = frozenset({"scale", "conntrack", "lb"})


def _handle_service_request(instance, op: str, message: dict) -> object:
    """Serve `scale`, `conntrack` and `lb` (tapnet.servicectl)."""
    import trio

    from tapnet import servicectl

    now = trio.current_time()
    node = message.get("node")
    if node is not None and not isinstance(node, str):
        raise ValueError('invalid request: "node" must be a string')
    if op == "conntrack":
        return servicectl.conntrack_view(instance, node, now, entries=not message.get("count_only", False))
    if op == "lb":
        return servicectl.lb_view(instance, node, now)
    service, replicas = message.get("service"), message.get("replicas")
    if not isinstance(service, str) or not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ValueError('invalid request: scale needs "service" (string) and "replicas" (integer)')
    return servicectl.apply_scale(instance, service, replicas)


def _object_id(instance: str, kind: str, name: str) -> str:
    """Return a stable 25-character ID, like swarm's object IDs (tapnet objects have no real IDs)."""
    return hashlib.sha256(f"{instance}/{kind}/{name}".encode()).hexdigest()[:25]


def overlay_device_names(network_id: str, vni: int) -> tuple[str, str]:
    """Return the names Docker gives an overlay's bridge and VXLAN device on each node.

    libnetwork's overlay driver names them `ov-<VNI as 6 hex digits>-<first 5
    characters of the network ID>` and `vx-...` alike, inside the network's
    sandbox namespace of every node. tapnet creates neither device (its
    datapath is both), and shows the names so that a reader can map tapnet's
    view onto a Docker host's `ip link`.
    """
    short_id = network_id[:5]
    return f"ov-{vni:06x}-{short_id}", f"vx-{vni:06x}-{short_id}"


def _overlay_view(instance, network, network_id: str) -> dict:
    """Build the overlay part of `inspect NETWORK`: the VNI, per node Docker's device names and the VTEP, and external peers."""
    from tapnet.model import VXLAN_PORT, format_mac

    bridge, vxlan_device = overlay_device_names(network_id, network.vni)
    hosts = instance.underlay.hosts
    nodes = {
        node.name: {
            "Bridge": bridge,
            "VXLAN": vxlan_device,
            "VTEP": f"{node.underlay_ip}:{VXLAN_PORT}",
            "HostNamespace": hosts.get(node.name, ""),
            "Port": f"{node.name}/vxlan",
        }
        for node in instance.cluster.nodes
    }
    external = [
        {"IPAddress": str(peer.ip), "MacAddress": format_mac(peer.mac), "VTEP": f"{peer.vtep}:{VXLAN_PORT}"}
        for peer in instance.cluster.external_peers
        if peer.network == network.name
    ]
    return {"VNI": network.vni, "Nodes": nodes, "ExternalPeers": external}


def _interface(ip, network) -> str:
    return f"{ip}/{network.subnet.prefixlen}"


def view_summary(instance) -> dict:
    """Networks, sandboxes and services of the instance, for the table `start` prints."""
    from tapnet.model import format_mac

    cluster = instance.cluster
    return {
        "instance": instance.name,
        "pid": os.getpid(),
        "stack": instance.stack_label,
        "underlay": {"subnet": str(cluster.underlay), "namespace": instance.underlay.namespace},
        "hosts": [
            {"name": n.name, "kind": "node", "namespace": instance.underlay.hosts.get(n.name, ""), "address": str(n.underlay_ip)}
            for n in cluster.nodes
        ]
        + [
            {"name": name, "kind": "client", "namespace": instance.underlay.clients.get(name, ""), "address": str(ip)}
            for name, ip in cluster.clients.items()
        ],
        "networks": [
            {"name": n.name, "driver": n.driver, "subnet": str(n.subnet), "gateway": str(n.gateway), "vni": n.vni, "internal": n.internal}
            for n in cluster.networks.values()
        ],
        "sandboxes": [
            {
                "name": s.name,
                "node": s.node,
                "namespace": instance.namespaces.get(s.name, ""),
                "endpoints": [
                    {"ifname": e.ifname, "network": e.network, "address": _interface(e.ip, cluster.networks[e.network]), "mac": format_mac(e.mac)}
                    for e in s.endpoints
                ],
            }
            for s in cluster.sandboxes.values()
        ],
        "services": [
            {
                "name": s.name,
                "mode": s.endpoint_mode,
                "replicas": s.replicas,
                "vips": {net: str(ip) for net, ip in s.vips.items()},
                "ports": [f"{p.published}:{p.target}/{p.protocol} ({p.mode})" for p in s.ports],
            }
            for s in cluster.services.values()
        ],
    }


def view_ps(instance) -> list[dict]:
    rows = []
    for sandbox in instance.cluster.sandboxes.values():
        task = instance.tasks.get(sandbox.name)
        if task is None:
            status, pid = "no command", None
        elif task.exit_status is None:
            status, pid = "running", task.popen.pid
        else:
            status, pid = f"exited ({task.exit_status})", task.popen.pid
        rows.append(
            {
                "sandbox": sandbox.name,
                "service": sandbox.service,
                "node": sandbox.node,
                "namespace": instance.namespaces.get(sandbox.name, ""),
                "addresses": {e.network: str(e.ip) for e in sandbox.endpoints},
                "pid": pid,
                "status": status,
                "command": task.argv if task else None,
            }
        )
    return rows


def view_inspect(instance, name: str) -> list[dict]:
    """Describe a network, service or sandbox as `docker network|service|container inspect` would."""
    cluster = instance.cluster
    if name in cluster.networks:
        return [_inspect_network(instance, cluster.networks[name])]
    if name in cluster.services:
        import trio

        from tapnet import servicectl

        view = _inspect_service(instance, cluster.services[name])
        # tapnet's own view, beside Docker's fields: VIPs per node as `tapnet lb` shows them,
        # and the conntrack entries whose backend is a task of this service.
        now = trio.current_time()
        tasks = {int(e.ip) for s in cluster.sandboxes.values() if s.service == name for e in s.endpoints}
        connections = {
            node: [row for row in table["entries"] if row.get("backend") in tasks]
            for node, table in servicectl.conntrack_view(instance, None, now).items()
        }
        view["LoadBalancer"] = {"VirtualServers": servicectl.lb_view(instance, None, now, service=name), "Connections": connections}
        return [view]
    if name in cluster.sandboxes:
        return [_inspect_sandbox(instance, cluster.sandboxes[name])]
    raise ValueError(f"no network, service or sandbox named {name!r} in instance {instance.name!r}")


def _inspect_network(instance, network) -> dict:
    from tapnet.model import format_mac

    cluster = instance.cluster
    containers = {}
    for sandbox in cluster.sandboxes.values():
        endpoint = sandbox.endpoint_on(network.name)
        if endpoint is not None:
            containers[sandbox.name] = {
                "Name": sandbox.name,
                "EndpointID": _object_id(instance.name, "endpoint", f"{sandbox.name}/{endpoint.ifname}"),
                "MacAddress": format_mac(endpoint.mac),
                "IPv4Address": _interface(endpoint.ip, network),
                "IPv6Address": "",
                "Node": sandbox.node,
                "Interface": endpoint.ifname,
            }
    services = {
        s.name: {"VIP": str(s.vips[network.name]) if network.name in s.vips else "", "Tasks": [sb.name for sb in cluster.sandboxes.values() if sb.service == s.name and sb.endpoint_on(network.name)]}
        for s in cluster.services.values()
        if network.name in s.networks or (network.ingress and network.name in s.vips)
    }
    options = {"com.docker.network.driver.mtu": str(network.mtu)}
    if network.vni is not None:
        options["com.docker.network.driver.overlay.vxlanid_list"] = str(network.vni)
    network_id = _object_id(instance.name, "network", network.name)
    view = {
        "Name": network.name,
        "Id": network_id,
        "Scope": "swarm" if network.driver == "overlay" else "local",
        "Driver": network.driver,
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": [{"Subnet": str(network.subnet), "Gateway": str(network.gateway)}]},
        "Internal": network.internal,
        "Attachable": network.attachable,
        "Ingress": network.ingress,
        "Containers": containers,
        "Services": services,
        "Options": options,
        "Labels": {},
        "Node": network.node,
    }
    if network.driver == "overlay" and network.vni is not None:
        # Docker lists the swarm nodes that take part in an overlay as Peers.
        view["Peers"] = [{"Name": node.name, "IP": str(node.underlay_ip)} for node in cluster.nodes]
        view["Overlay"] = _overlay_view(instance, network, network_id)
    return view


def _inspect_service(instance, service) -> dict:
    cluster = instance.cluster
    ports = [{"Protocol": p.protocol, "TargetPort": p.target, "PublishedPort": p.published, "PublishMode": p.mode} for p in service.ports]
    endpoint_spec = {"Mode": service.endpoint_mode, "Ports": ports}
    return {
        "ID": _object_id(instance.name, "service", service.name),
        "Spec": {
            "Name": service.name,
            "Mode": {"Replicated": {"Replicas": service.replicas}},
            "TaskTemplate": {
                "ContainerSpec": {"Command": service.command},
                "Networks": [{"Target": net, "Aliases": list(service.aliases.get(net, ()))} for net in service.networks],
                "Placement": {"Nodes": service.placement} if service.placement else {},
            },
            "EndpointSpec": endpoint_spec,
        },
        "Endpoint": {
            "Spec": endpoint_spec,
            "Ports": ports,
            "VirtualIPs": [{"NetworkID": net, "Addr": _interface(ip, cluster.networks[net])} for net, ip in service.vips.items()],
        },
        "Tasks": [s.name for s in cluster.sandboxes.values() if s.service == service.name],
    }


def _inspect_sandbox(instance, sandbox) -> dict:
    from tapnet.model import format_mac

    cluster = instance.cluster
    task = instance.tasks.get(sandbox.name)
    namespace = instance.namespaces.get(sandbox.name, "")
    if task is None:
        state = {"Status": "created", "Running": False, "Pid": 0, "ExitCode": 0}
    else:
        running = task.exit_status is None
        state = {"Status": "running" if running else "exited", "Running": running, "Pid": task.popen.pid, "ExitCode": task.exit_status or 0}
    networks = {}
    for endpoint in sandbox.endpoints:
        network = cluster.networks[endpoint.network]
        networks[endpoint.network] = {
            "NetworkID": _object_id(instance.name, "network", network.name),
            "EndpointID": _object_id(instance.name, "endpoint", f"{sandbox.name}/{endpoint.ifname}"),
            "Interface": endpoint.ifname,
            "IPAddress": str(endpoint.ip),
            "IPPrefixLen": network.subnet.prefixlen,
            "Gateway": str(network.gateway),
            "MacAddress": format_mac(endpoint.mac),
            "MTU": endpoint.mtu,
            "Aliases": list(endpoint.aliases),
        }
    return {
        "Name": sandbox.name,
        "Service": sandbox.service,
        "Slot": sandbox.slot,
        "Node": sandbox.node,
        "State": state,
        "Config": {"Cmd": sandbox.command},
        "LogPath": str(task.log_path) if task else "",
        "NetworkSettings": {
            "SandboxKey": f"/run/netns/{namespace}",
            "DefaultGateway": str(sandbox.default_gateway) if sandbox.default_gateway else "",
            "Networks": networks,
        },
    }


# ---------------------------------------------------------------- output


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    hosts = format_table(
        ["HOST", "KIND", "NAMESPACE", f"UNDERLAY {summary['underlay']['subnet']}"],
        [[h["name"], h["kind"], h["namespace"], h["address"]] for h in summary["hosts"]],
    )
    networks = format_table(
        ["NETWORK", "DRIVER", "SUBNET", "GATEWAY", "VNI", "INTERNAL"],
        [[n["name"], n["driver"], n["subnet"], n["gateway"], n["vni"] or "-", "yes" if n["internal"] else "no"] for n in summary["networks"]],
    )
    sandboxes = format_table(
        ["SANDBOX", "NODE", "NAMESPACE", "ENDPOINTS"],
        [
            [s["name"], s["node"], s["namespace"], ", ".join(f"{e['ifname']} {e['network']} {e['address']}" for e in s["endpoints"])]
            for s in summary["sandboxes"]
        ],
    )
    services = format_table(
        ["SERVICE", "MODE", "REPLICAS", "VIPS", "PORTS"],
        [
            [s["name"], s["mode"], s["replicas"], ", ".join(f"{net} {ip}" for net, ip in s["vips"].items()) or "-", ", ".join(s["ports"]) or "-"]
            for s in summary["services"]
        ],
    )
    return f"{hosts}\n\n{networks}\n\n{sandboxes}\n\n{services}"


def format_ps(rows: list[dict]) -> str:
    return format_table(
        ["SANDBOX", "SERVICE", "NODE", "NAMESPACE", "ADDRESSES", "PID", "STATUS"],
        [
            [r["sandbox"], r["service"], r["node"], r["namespace"], ", ".join(f"{net} {ip}" for net, ip in r["addresses"].items()), r["pid"] or "-", r["status"]]
            for r in rows
        ],
    )


def format_stats(counters: dict) -> str:
    """Per-port counters in the layout of `ip -s link`."""
    blocks = []
    for port, c in sorted(counters.items()):
        dropped = sum(c["drops"].values())
        lines = [
            f"{port}:",
            "    RX:  bytes    packets  dropped",
            f"    {c['rx_bytes']:>10} {c['rx_packets']:>8} {dropped:>8}",
            "    TX:  bytes    packets",
            f"    {c['tx_bytes']:>10} {c['tx_packets']:>8}",
        ]
        for reason, n in sorted(c["drops"].items()):
            lines.append(f"    drop {reason}: {n}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ---------------------------------------------------------------- commands


def _check_instance(name: str) -> None:
    from tapnet.netns import check_name_part  # cheap: netns is imported by start and stop anyway

    check_name_part("instance", name)


def _fail(message: str) -> int:
    print(f"tapnet: {message}", file=sys.stderr)
    return 1


def _load_cluster(stack: str | None):
    """Compile the stack file (or the demo), avoiding every network of the root namespace."""
    from tapnet import netns, stack as stack_module

    root_networks = netns.root_networks()
    if stack is None:
        return stack_module.load_demo(root_networks=root_networks), "built-in demo"
    path = Path(stack)
    if not path.is_file():
        raise stack_module.StackError(f"stack file {stack} not found")
    return stack_module.load_stack(path, root_networks=root_networks), str(path.resolve())


def cmd_start(args: argparse.Namespace) -> int:
    from tapnet import netns, stack as stack_module
    from tapnet.state import InstanceLock, InstanceRunning, StateError

    try:
        _check_instance(args.instance)
        netns.check_host_support()
        if InstanceLock(args.instance).is_held_elsewhere():
            raise InstanceRunning(f"instance {args.instance!r} is already running; stop it with `tapnet stop --instance {args.instance}`")
        cluster, label = _load_cluster(args.stack)
    except stack_module.StackError as error:
        return _fail(f"invalid stack: {error}")
    except (ValueError, netns.NetnsError, StateError) as error:
        return _fail(str(error))
    for warning in cluster.warnings:
        print(f"tapnet: warning: {warning}", file=sys.stderr)

    if args.detach:
        return _start_detached(args)
    return _run_foreground(args, cluster, label, announce=not args.daemon_child)


def _run_foreground(args: argparse.Namespace, cluster, label: str, announce: bool) -> int:
    from tapnet import netns, runtime
    from tapnet.state import StateError

    def on_ready(instance) -> None:
        log.info("instance %s ready: %d sandboxes, pid %d", instance.name, len(instance.namespaces), os.getpid())
        if announce:
            print(format_summary(view_summary(instance)))
            print(f"\ntapnet: instance {instance.name!r} running (pid {os.getpid()}); Ctrl-C or `tapnet stop --instance {instance.name}` stops it", flush=True)

    try:
        status = runtime.run_daemon(
            args.instance, cluster, serve_control, on_ready, stack_label=label, seed=args.seed, conntrack_max=args.conntrack_max
        )
        if announce and status == 0:
            print(f"tapnet: instance {args.instance!r} stopped; its namespaces, TAPs and processes were removed", flush=True)
        return status
    except (netns.NetnsError, StateError, ValueError) as error:
        return _fail(f"starting instance {args.instance!r} failed: {error}")
    except KeyboardInterrupt:
        # Interrupted before the instance was ready; run_daemon has removed what it made.
        return _fail(f"start of instance {args.instance!r} interrupted; everything it created was removed") + 129


def _start_detached(args: argparse.Namespace) -> int:
    """Re-run `start` in the background and wait until its control socket responds."""
    directory = state_dir(args.instance)
    directory.mkdir(parents=True, exist_ok=True)
    daemon_log = directory / "daemon.log"
    argv = [sys.executable, "-m", "tapnet.cli", "-v", "start", "--instance", args.instance, "--daemon-child"]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.conntrack_max is not None:
        argv += ["--conntrack-max", str(args.conntrack_max)]
    if args.stack is not None:
        argv.append(str(Path(args.stack).resolve()))
    with open(daemon_log, "ab") as output:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        status = child.poll()
        if status is not None:
            tail = daemon_log.read_text(errors="replace").splitlines()[-15:]
            return _fail(f"daemon of instance {args.instance!r} exited with status {status} before it was ready; {daemon_log} ends with:\n" + "\n".join(tail))
        try:
            info = request(args.instance, "ping", timeout=1.0)
        except ControlError:
            time.sleep(0.1)
            continue
        if info.get("pid") == child.pid:
            print(format_summary(request(args.instance, "summary")))
            print(f"\ntapnet: instance {args.instance!r} running in the background (pid {child.pid}, log {daemon_log}); `tapnet stop --instance {args.instance}` stops it")
            return 0
        time.sleep(0.1)

    child.send_signal(signal.SIGTERM)  # our own child: its cleanup removes what it made
    return _fail(f"daemon of instance {args.instance!r} was not ready after {DETACH_TIMEOUT:g} s; sent SIGTERM; see {daemon_log}")


def cmd_stop(args: argparse.Namespace) -> int:
    from tapnet.state import InstanceLock, InstanceRunning, StateError, StateFile, clean_leftovers, is_same_process

    try:
        _check_instance(args.instance)
    except ValueError as error:
        return _fail(str(error))
    if os.geteuid() != 0:
        return _fail("tapnet stop needs root; run it with sudo")
    lock = InstanceLock(args.instance)
    running = lock.is_held_elsewhere()

    if running:
        try:
            request(args.instance, "stop")
        except ControlError as error:
            # The daemon holds the lock but does not respond, so end it by signal.
            state = StateFile.load(args.instance)
            daemon = (state.daemon if state else None) or {}
            if not daemon or not is_same_process(daemon["pid"], daemon.get("start_time")):
                return _fail(f"{error}; and no daemon PID is recorded, so nothing was stopped")
            log.warning("instance %s: %s; sending SIGTERM to pid %d", args.instance, error, daemon["pid"])
            os.kill(daemon["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while lock.is_held_elsewhere() and time.monotonic() < deadline:
            time.sleep(0.1)
        if lock.is_held_elsewhere():
            return _fail(f"instance {args.instance!r} did not stop within {STOP_TIMEOUT:g} s; see {state_dir(args.instance) / 'daemon.log'}")

    try:
        report = clean_leftovers(args.instance)
    except InstanceRunning:
        return _fail(f"instance {args.instance!r} was started again meanwhile; not touched")
    except StateError as error:
        return _fail(str(error))
    if report is not None:
        print(f"tapnet: instance {args.instance!r}: leftovers removed: {report.summary()}")
    if running or report is not None:
        print(f"tapnet: instance {args.instance!r} stopped")
    else:
        print(f"tapnet: instance {args.instance!r} is not running and left nothing behind; nothing to stop")
    return 0


def _client_command(args: argparse.Namespace, op: str, **arguments):
    _check_instance(args.instance)
    return request(args.instance, op, **arguments)


def cmd_ps(args: argparse.Namespace) -> int:
    try:
        rows = _client_command(args, "ps")
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    print(json.dumps(rows, indent=2) if args.json else format_ps(rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        result = _client_command(args, "inspect", name=args.name)
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    print(json.dumps(result, indent=4))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        counters = _client_command(args, "stats")
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    print(json.dumps(counters, indent=2, sort_keys=True) if args.json else format_stats(counters))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _fail("exec needs a command: tapnet exec SANDBOX -- CMD [ARG...]")
    try:
        sandbox = _client_command(args, "sandbox", name=args.sandbox)
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    # Replace this process, so the command's exit status and signals reach the caller unchanged.
    argv = ["ip", "netns", "exec", sandbox["namespace"], *command]
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        return _fail(f"running {' '.join(argv)} failed: {error}")


def _conntrack_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= CONNTRACK_MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"invalid conntrack size {text!r}: expected an integer from 1 to {CONNTRACK_MAX_LIMIT}")
    return int(text)


# Largest --conntrack-max: 4 Mi entries take about 500 MiB (tapnet.nat.Conntrack, 56 bytes per entry plus 4 index slots of 16 bytes).
CONNTRACK_MAX_LIMIT = 1 << 22
SCALE_TIMEOUT = 120.0  # seconds `scale` waits, because the daemon creates namespaces and ends tasks before it responds


def cmd_scale(args: argparse.Namespace) -> int:
    from tapnet.scale import ScaleError, parse_request

    try:
        _check_instance(args.instance)
        requests = [parse_request(text) for text in args.requests]
    except (ScaleError, ValueError) as error:
        return _fail(str(error))
    for service, replicas in requests:
        try:
            result = request(args.instance, "scale", timeout=SCALE_TIMEOUT, service=service, replicas=replicas)
        except ControlError as error:
            return _fail(f"scaling {service} to {replicas} failed: {error}")
        print(f"{service} scaled to {replicas}: added {', '.join(result['added']) or 'none'}; removed {', '.join(result['removed']) or 'none'}")
    return 0


def cmd_conntrack(args: argparse.Namespace) -> int:
    from tapnet import servicectl

    try:
        view = _client_command(args, "conntrack", node=args.node, count_only=args.count)
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    print(json.dumps(view, indent=2) if args.json else servicectl.format_conntrack(view))
    return 0


def cmd_lb(args: argparse.Namespace) -> int:
    from tapnet import servicectl

    try:
        view = _client_command(args, "lb", node=args.node)
    except (ControlError, ValueError) as error:
        return _fail(str(error))
    print(json.dumps(view, indent=2) if args.json else servicectl.format_lb(view))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--instance", default=DEFAULT_INSTANCE, metavar="NAME", help=f"instance name (default {DEFAULT_INSTANCE!r})")
        parser.set_defaults(func=func)
        return parser

    start = add("start", cmd_start, "Build the stack's sandboxes and networks and run the datapath until stopped.")
    start.add_argument("stack", nargs="?", metavar="STACK", help="compose / stack file (default: the built-in demo)")
    start.add_argument("--detach", action="store_true", help="return once the instance is up; the daemon keeps running in the background")
    start.add_argument("--seed", type=int, default=None, help="seed of the datapath's random generator (default: random, logged)")
    start.add_argument(
        "--conntrack-max", type=_conntrack_size, default=None, metavar="N",
        help="conntrack entries per node; when full, the oldest unreplied entry is evicted (default 65536)",
    )
    start.add_argument("--daemon-child", action="store_true", help=argparse.SUPPRESS)

    add("stop", cmd_stop, "Stop the instance and remove everything it made, also after a crash.")

    ps = add("ps", cmd_ps, "List the instance's sandboxes with their addresses and task status.")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = add("inspect", cmd_inspect, "Print a network, service or sandbox as JSON, shaped like `docker ... inspect`.")
    inspect.add_argument("name", metavar="NETWORK|SERVICE|SANDBOX")

    stats = add("stats", cmd_stats, "Print per-port counters and drops per reason, like `ip -s link`.")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")

    exec_parser = add("exec", cmd_exec, "Run a command inside a sandbox's network namespace; its exit status is returned.")
    exec_parser.add_argument("sandbox", metavar="SANDBOX")
    exec_parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command and arguments")

    scale = add("scale", cmd_scale, "Set the number of tasks of services, like `docker service scale`.")
    scale.add_argument("requests", nargs="+", metavar="SERVICE=REPLICAS", help="for example web=3")

    conntrack = add("conntrack", cmd_conntrack, "List the conntrack entries of each node's load balancer, like `conntrack -L`.")
    conntrack.add_argument("--node", default=None, metavar="NODE", help="only this node (default: every node)")
    conntrack.add_argument("-C", "--count", action="store_true", help="print only the counters (entries, maximum, evictions, ...)")
    conntrack.add_argument("--json", action="store_true", help="print JSON: counters and entries per node")

    lb = add("lb", cmd_lb, "List each node's VIPs with their tasks and active connections, like `ipvsadm -Ln`.")
    lb.add_argument("--node", default=None, metavar="NODE", help="only this node (default: every node)")
    lb.add_argument("--json", action="store_true", help="print JSON instead of text")
