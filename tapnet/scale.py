"""Change a service's replica count on a compiled cluster, as `docker service scale` does.

Scaling keeps every task that stays: same sandbox name, node and addresses.
Scaling down removes the highest slots. Scaling up adds slots after the
highest one; each new endpoint takes the lowest free address of its network,
and each new task goes to the allowed node with the fewest tasks (ties by
node order), except that tasks on a bridge network stay on that network's
node. The result is a new `Cluster`; the old one is not changed.
"""

from __future__ import annotations

import copy
import ipaddress

from tapnet.model import Cluster, Endpoint, Sandbox, mac_for_ip


class ScaleError(ValueError):
    """The requested scale cannot be applied (unknown service, no free address, ...)."""


def parse_request(text: str) -> tuple[str, int]:
    """Read `SERVICE=N` as `docker service scale` takes it."""
    name, sep, count = text.partition("=")
    if not sep or not name or not count.isdigit():
        raise ScaleError(
            f"invalid scale request {text!r}: expected SERVICE=REPLICAS with REPLICAS a whole number, 0 or more, "
            "for example web=3"
        )
    return name, int(count)


def used_addresses(cluster: Cluster, network: str) -> set[ipaddress.IPv4Address]:
    net = cluster.networks[network]
    used = {net.gateway, net.subnet.network_address, net.subnet.broadcast_address}
    for service in cluster.services.values():
        if network in service.vips:
            used.add(service.vips[network])
    for sandbox in cluster.sandboxes.values():
        for endpoint in sandbox.endpoints:
            if endpoint.network == network:
                used.add(endpoint.ip)
    if net.ingress:
        used.update(cluster.ingress_sbox_ips.values())
    for peer in cluster.external_peers:
        if peer.network == network:
            used.add(peer.ip)
    return used


def scale(cluster: Cluster, service_name: str, replicas: int) -> Cluster:
    """Return a copy of `cluster` where `service_name` runs `replicas` tasks."""
    if service_name not in cluster.services:
        known = ", ".join(sorted(cluster.services)) or "none"
        raise ScaleError(f"unknown service {service_name!r}; services: {known}")
    if replicas < 0:
        raise ScaleError(f"replicas must be 0 or more, got {replicas}")
    result = copy.deepcopy(cluster)
    service = result.services[service_name]
    tasks = sorted((s for s in result.sandboxes.values() if s.service == service_name), key=lambda s: s.slot)

    for sandbox in tasks[replicas:]:
        del result.sandboxes[sandbox.name]
    if len(tasks) < replicas:
        template = tasks[0] if tasks else None
        next_slot = (tasks[-1].slot if tasks else 0) + 1
        for slot in range(next_slot, next_slot + replicas - len(tasks)):
            result.sandboxes[f"{service_name}.{slot}"] = _new_task(result, service_name, slot, template)
    service.replicas = replicas
    return result


def _new_task(cluster: Cluster, service_name: str, slot: int, template: Sandbox | None) -> Sandbox:
    service = cluster.services[service_name]
    networks = (["ingress"] if service.publishes_ingress else []) + list(service.networks)
    endpoints = []
    for index, network in enumerate(networks):
        net = cluster.networks[network]
        used = used_addresses(cluster, network)
        address = next((a for a in net.subnet.hosts() if a not in used), None)
        if address is None:
            raise ScaleError(f"network {network!r} ({net.subnet}) has no free address for {service_name}.{slot}")
        aliases = service.aliases.get(network, ())
        endpoints.append(Endpoint(network, f"eth{index}", address, mac_for_ip(address), net.mtu, tuple(aliases)))
    gateway = next(
        (cluster.networks[e.network].gateway for e in endpoints
         if not cluster.networks[e.network].ingress and not cluster.networks[e.network].internal),
        None,
    )
    return Sandbox(
        name=f"{service_name}.{slot}",
        service=service_name,
        slot=slot,
        node=_choose_node(cluster, service_name),
        endpoints=endpoints,
        command=copy.deepcopy(template.command) if template else copy.deepcopy(service.command),
        default_gateway=gateway,
    )


def _choose_node(cluster: Cluster, service_name: str) -> str:
    service = cluster.services[service_name]
    for network in service.networks:
        pinned = cluster.networks[network].node
        if pinned is not None:
            return pinned
    allowed = service.placement or [n.name for n in cluster.nodes]
    load = {name: 0 for name in allowed}
    for sandbox in cluster.sandboxes.values():
        if sandbox.node in load:
            load[sandbox.node] += 1
    return min(allowed, key=lambda name: (load[name], allowed.index(name)))
