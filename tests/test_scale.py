"""Scaling a compiled cluster: kept tasks stay put, new ones take free addresses."""

import pytest

from dpkit import Wire
from tapnet.scale import ScaleError, parse_request, scale
from tapnet.stack import load_stack

STACK = """
x-tapnet:
  nodes: [node1, node2]
services:
  web:
    deploy: {replicas: 3}
    ports: ["3000:80"]
    networks: [app]
  db:
    networks: [app]
networks:
  app:
    driver: overlay
    ipam: {config: [{subnet: 10.10.0.0/24}]}
"""


@pytest.fixture
def cluster():
    return load_stack(STACK)


def test_scale_down_removes_highest_slots(cluster):
    smaller = scale(cluster, "web", 1)
    assert sorted(s for s in smaller.sandboxes if s.startswith("web.")) == ["web.1"]
    assert smaller.sandboxes["web.1"].endpoints == cluster.sandboxes["web.1"].endpoints


def test_scale_keeps_other_services_untouched(cluster):
    bigger = scale(cluster, "web", 5)
    assert bigger.sandboxes["db.1"] == cluster.sandboxes["db.1"]
    assert bigger.services["db"].vips == cluster.services["db"].vips


def test_scale_up_takes_free_addresses(cluster):
    bigger = scale(cluster, "web", 5)
    addresses = [e.ip for s in bigger.sandboxes.values() for e in s.endpoints]
    assert len(addresses) == len(set(addresses))
    new = bigger.sandboxes["web.5"]
    assert [e.network for e in new.endpoints] == ["ingress", "app"]
    assert all(e.mac == b"\x02\x42" + e.ip.packed for e in new.endpoints)


def test_scale_up_spreads_over_nodes(cluster):
    bigger = scale(cluster, "web", 6)
    nodes = [s.node for s in bigger.sandboxes.values()]
    assert abs(nodes.count("node1") - nodes.count("node2")) <= 1


def test_scale_does_not_change_input(cluster):
    before = sorted(cluster.sandboxes)
    scale(cluster, "web", 0)
    assert sorted(cluster.sandboxes) == before


def test_scaled_cluster_drives_the_datapath(cluster):
    wire = Wire(cluster)
    added = wire.fabric.update_cluster(scale(cluster, "web", 4))
    names = [wire.fabric.port_names[p] for p in added]
    assert any("/web.4/" in n for n in names)


@pytest.mark.parametrize("text", ["web", "web=", "=3", "web=-1", "web=x"])
def test_scale_request_syntax(text):
    with pytest.raises(ScaleError):
        parse_request(text)


def test_scale_unknown_service(cluster):
    with pytest.raises(ScaleError, match="unknown service"):
        scale(cluster, "nope", 2)
