"""Daemon side of `tapnet scale`, `tapnet conntrack` and `tapnet lb`, and the text those commands print.

`apply_scale` changes a service's replica count on the running instance:

1. `tapnet.scale.scale` computes the new cluster (names, nodes, addresses).
2. Sandboxes of new tasks are created through the runtime's own path
   (`Instance.realise_sandbox`: namespace recorded in the state file first,
   /etc/netns files, TAPs).
3. `Fabric.update_cluster` switches the datapath to the new cluster. From
   then on removed tasks get no new connection, and the ports of new tasks
   exist, so their TAP fds join the TAP loop.
4. New tasks start their command. Removed tasks have their processes ended,
   their TAPs closed, and their namespace, /etc/netns directory and state
   entries removed.

The views read each node's `LoadBalancer` (`fabric.nodes[node].lb`): its
conntrack table in the layout of `conntrack -L`, and its VIPs in the layout
of `ipvsadm -Ln`.

This module imports neither numba nor pyroute2 at import time, so client
commands can use its formatting functions and still start quickly.
"""

from __future__ import annotations

import logging

from tapnet import netns, state as state_module

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- conntrack size


def size_conntrack(fabric, max_entries: int | None, seed: int) -> None:
    """Give every node's load balancer a fresh conntrack table of `max_entries` with a hash seed from `seed`.

    Must run before any frame reaches the fabric. The ingress sandbox of a
    node shares its load balancer's table, as `tapnet.lb.install` sets up.
    """
    from tapnet import lb, nat

    size = lb.CONNTRACK_MAX if max_entries is None else max_entries
    for offset, datapath in enumerate(fabric.nodes.values()):
        # A secret hash seed keeps a flood with chosen ports from lengthening probe runs (see nat.Conntrack).
        table = nat.Conntrack(max_entries=size, hash_seed=(seed + offset) & ((1 << 63) - 1))
        datapath.lb.ct = table
        datapath.ingress.ct = table


# ---------------------------------------------------------------- scale


def apply_scale(instance, service: str, replicas: int) -> dict:
    """Run `service` with `replicas` tasks on the running instance; return the sandboxes added and removed.

    Raises tapnet.scale.ScaleError (a ValueError) for an unknown service or
    a full subnet, before anything changes.
    """
    from tapnet import scale

    old = instance.cluster
    new = scale.scale(old, service, replicas)
    added = [sandbox for name, sandbox in new.sandboxes.items() if name not in old.sandboxes]
    removed = [sandbox for name, sandbox in old.sandboxes.items() if name not in new.sandboxes]

    new_taps: list[netns.Tap] = []
    try:
        for sandbox in added:
            new_taps.extend(instance.realise_sandbox(sandbox, new))
    except BaseException:
        for tap in new_taps:
            tap.close()
        for sandbox in added:
            remove_sandbox(instance, sandbox.name)
        raise

    instance.fabric.update_cluster(new)
    instance.cluster = new
    instance.loop.add_taps(new_taps)
    for sandbox in added:
        instance.start_task(sandbox)

    for sandbox in removed:
        remove_sandbox(instance, sandbox.name)
    log.info(
        "instance %s: service %s scaled to %d (added %s, removed %s)",
        instance.name, service, replicas, [s.name for s in added] or "none", [s.name for s in removed] or "none",
    )
    return {"service": service, "replicas": replicas, "added": [s.name for s in added], "removed": [s.name for s in removed]}


def remove_sandbox(instance, name: str) -> None:
    """End a sandbox's processes, close its TAPs, and remove its namespace, /etc/netns directory and state entries."""
    namespace = netns.namespace_name(instance.name, name)
    etc_path = str(netns.ETC_NETNS_DIR / namespace)
    state = instance.state
    entries = [o for o in state.objects if o.get("sandbox") == name or (o["kind"] == "etc_netns" and o.get("path") == etc_path)]

    recorded = [(o["pid"], o.get("start_time")) for o in entries if o["kind"] == "process"]
    state_module.end_processes(recorded)
    task = instance.tasks.pop(name, None)
    if task is not None:
        task.popen.poll()

    if instance.loop is not None:
        instance.loop.remove_taps([tap for tap in instance.loop.taps if tap.sandbox == name])
    else:
        for tap in [tap for tap in instance.taps if tap.sandbox == name]:
            tap.close()
            instance.taps.remove(tap)

    for entry in entries:
        if entry["kind"] == "netns":
            current = netns.namespace_identity(entry["name"])
            if current is None:
                continue
            if entry.get("identity") is not None and list(current) != list(entry["identity"]):
                log.warning("namespace %s of sandbox %s changed identity since it was created, so it was not removed", entry["name"], name)
                continue
            state_module.end_processes(state_module.processes_in_namespaces([current]))
            netns.remove_namespace(entry["name"], entry.get("identity"))
        elif entry["kind"] == "etc_netns":
            netns.remove_etc_dir(entry["path"])

    state.objects = [o for o in state.objects if not any(o is entry for entry in entries)]
    state.save()
    instance.namespaces.pop(name, None)


# ---------------------------------------------------------------- views


def _nodes(instance, node: str | None) -> list[str]:
    names = list(instance.fabric.nodes)
    if node is None or node == "":
        return names
    if node not in names:
        raise ValueError(f"no node named {node!r} in instance {instance.name!r}; nodes: {', '.join(names)}")
    return [node]


def conntrack_view(instance, node: str | None, now: float, entries: bool = True) -> dict:
    """Return each node's conntrack counters and, with `entries`, its live entries (`line` is `conntrack -L` text)."""
    result = {}
    for name in _nodes(instance, node):
        balancer = instance.fabric.nodes[name].lb
        table = balancer.ct
        view = {
            "count": len(table),
            "max": table.capacity,
            "evictions": table.evictions,
            "overflows": table.overflows,
            "clashes": table.clashes,
            "expired": table.expired,
        }
        if entries:
            view["entries"] = balancer.conntrack_rows(now)
        result[name] = view
    return result


def lb_view(instance, node: str | None, now: float, service: str | None = None) -> dict:
    """Return each node's VIPs with their tasks and active connections (`lb_rows`), optionally of one service only."""
    result = {}
    for name in _nodes(instance, node):
        rows = instance.fabric.nodes[name].lb.lb_rows(now)
        result[name] = [row for row in rows if service is None or row["service"] == service]
    return result


def format_conntrack(view: dict) -> str:
    """Entries as `conntrack -L` prints them, one block per node, then the counters as `conntrack -S` would sum them."""
    lines = []
    for node, table in view.items():
        lines.append(f"# node {node}")
        lines.extend(entry["line"] for entry in table.get("entries", []))
        lines.append(
            f"# {table['count']} of {table['max']} entries; evictions {table['evictions']}, "
            f"overflows {table['overflows']}, clashes {table['clashes']}, expired {table['expired']}"
        )
    return "\n".join(lines)


def format_lb(view: dict) -> str:
    """VIPs in the layout of `ipvsadm -Ln`, one block per node.

    A Docker VIP takes every port, so a line shows the VIP address without a
    port, and tasks are reached on the port the client used (forwarding
    method Masq, IPVS's name for NAT).
    """
    lines = []
    for node, rows in view.items():
        lines.append(f"# node {node}")
        lines.append("Prot LocalAddress:Port Scheduler Flags")
        lines.append("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn")
        for row in rows:
            lines.append(f"VIP  {row['vip']}:* {row['scheduler']}  # service {row['service']} on {row['network']}")
            for backend in row["backends"]:
                remote = f"{backend['address']}:*"
                lines.append(f"  -> {remote:<28} Masq    {backend['weight']:<6} {backend['active']:<10} 0  # {backend['sandbox']}")
    return "\n".join(lines)
