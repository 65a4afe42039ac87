"""Helpers for datapath tests: a small stack, and frames in and out of a Fabric."""

from __future__ import annotations

import numpy as np
from scapy.layers.l2 import Ether

from tapnet.batch import FrameBatch
from tapnet.datapath import Fabric
from tapnet.model import format_mac

# Subnets chosen apart from every address of the machine's root namespace.
SMALL_STACK = """
services:
  proxy:
    networks: [front]
  app:
    networks: [front, back]
  db:
    networks: [back]
  vault:
    networks: [secret]
networks:
  front:
    driver: bridge
    ipam: {config: [{subnet: 172.20.0.0/24}]}
  back:
    driver: bridge
    ipam: {config: [{subnet: 172.21.0.0/24}]}
  secret:
    driver: bridge
    internal: true
    ipam: {config: [{subnet: 172.22.0.0/24}]}
"""


def small_cluster():
    from tapnet.stack import load_stack

    return load_stack(SMALL_STACK)


class Wire:
    """A Fabric plus the endpoint facts tests need, with frames as scapy packets."""

    def __init__(self, cluster=None, seed: int = 0):
        self.cluster = cluster or small_cluster()
        self.fabric = Fabric(self.cluster)
        self.rng = np.random.default_rng(seed)

    def endpoint(self, sandbox: str, network: str):
        return self.cluster.sandboxes[sandbox].endpoint_on(network)

    def port(self, sandbox: str, network: str) -> int:
        sbox = self.cluster.sandboxes[sandbox]
        endpoint = sbox.endpoint_on(network)
        return self.fabric.port_id(f"{sbox.node}/{sandbox}/{endpoint.ifname}")

    def ip(self, sandbox: str, network: str) -> str:
        return str(self.endpoint(sandbox, network).ip)

    def mac(self, sandbox: str, network: str) -> str:
        return format_mac(self.endpoint(sandbox, network).mac)

    def gateway(self, network: str) -> tuple[str, str]:
        net = self.cluster.networks[network]
        return str(net.gateway), format_mac(net.gateway_mac)

    def send(self, frames, now: float = 0.0, trace: bool = True):
        """Process (port, packet-or-bytes) pairs as one batch; returns the Result."""
        batch = FrameBatch(capacity_frames=max(16, len(frames)))
        for port, packet in frames:
            batch.append(port, bytes(packet), timestamp=now)
        return self.fabric.process(batch, now, self.rng, trace=trace)

    def out(self, result) -> list[tuple[int, Ether]]:
        return [(e.port, Ether(e.frame)) for e in result.emits]
