"""Graphviz diagrams of a cluster, in the manner of libnetwork's overlay diagrams.

`cluster_dot(cluster)` returns DOT source: one box per node with its host
namespace (underlay `eth0` with the VTEP, `gwbridge`, the ingress sandbox)
and its sandboxes, each sandbox listing its endpoints (`eth0 10.0.0.3/24`).
Bridge networks sit inside their node's box, overlay networks between the
nodes because they span all of them, and each endpoint is joined to its
network. VXLAN tunnels join the VTEPs of every pair of nodes (and of
external peers), labelled with the VNIs they carry. Each service with a VIP
gets a diamond on its networks, and a service that publishes ports shows the
ingress path: published port on the node, DNAT to the ingress sandbox on
`gwbridge`, ingress network, tasks.

With a story from `tapnet trace` (`story=`), the path of the traced frame is
drawn on top in red. Each hop gets numbered edges from the port where the
frame entered, through its network, to each port it left by. A dashed edge
joins the VTEPs of a tunnel crossing, and a drop ends in an octagon with its
reason.

`render(dot_source, path)` runs Graphviz's `dot` for `.svg`, `.png` and
`.pdf` files and writes `.dot` files as they are. Nothing here reads the
machine's state.
"""

from __future__ import annotations

import shutil
import subprocess
from html import escape
from pathlib import Path

from tapnet.model import GWBRIDGE_SUBNET, INGRESS_SBOX_GWBRIDGE_IP, VXLAN_PORT, Cluster

RENDER_FORMATS = ("svg", "png", "pdf")
DOT_TIMEOUT = 60.0  # seconds Graphviz may take to lay out one diagram

# Colours (Graphviz names): one per kind of object, so the legend stays implicit.
COLOUR_NODE = "#f4f4f4"
COLOUR_SANDBOX = "#dbe9f6"
COLOUR_HOST = "#e8e8e8"
COLOUR_OVERLAY = "#c8e6c9"
COLOUR_BRIDGE = "#fff3c4"
COLOUR_INTERNAL = "#eeeeee"
COLOUR_VIP = "#f8d7e8"
COLOUR_PATH = "#d62728"
COLOUR_PATH_FILL = "#ffd6d6"


class DiagramError(RuntimeError):
    """Graphviz is missing or failed to render."""


def _q(text: str) -> str:
    """Quote a DOT string; a newline becomes DOT's centred line break."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _sandbox_id(name: str) -> str:
    return _q(f"sandbox/{name}")


def _host_id(node: str) -> str:
    return _q(f"host/{node}")


def _network_id(name: str) -> str:
    return _q(f"network/{name}")


def _vip_id(service: str, network: str) -> str:
    return _q(f"vip/{service}/{network}")


def _ingress_sbox_id(node: str) -> str:
    return _q(f"ingress-sbox/{node}")


def port_endpoint(port: str, cluster: Cluster) -> str | None:
    """Return the DOT node (with record port) drawn for a datapath port name, or None when there is none."""
    parts = port.split("/")
    if len(parts) == 3 and parts[1] in cluster.sandboxes:
        return f"{_sandbox_id(parts[1])}:{_q(parts[2])}"
    if len(parts) == 2 and any(node.name == parts[0] for node in cluster.nodes):
        node, kind = parts
        if kind == "vxlan" or kind == "upstream":
            return f"{_host_id(node)}:eth0"
        if kind == "gwbridge":
            return f"{_host_id(node)}:gwbridge"
        if kind == "ingress-sbox":
            return _ingress_sbox_id(node)
    return None


def _table(title: str, subtitle: str, rows: list[tuple[str, str]], fill: str, highlighted: set[str]) -> str:
    """Build an HTML-like label: a title row, then one row per (port, text), highlighted rows in the path colour."""
    cells = [f'<TR><TD BGCOLOR="{fill}"><B>{escape(title)}</B>'
             + (f'<BR/><FONT POINT-SIZE="8">{escape(subtitle)}</FONT>' if subtitle else "") + "</TD></TR>"]
    for port, text in rows:
        colour = COLOUR_PATH_FILL if port in highlighted else "white"
        cells.append(f'<TR><TD PORT="{escape(port)}" BGCOLOR="{colour}" ALIGN="LEFT">{escape(text)}</TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">' + "".join(cells) + "</TABLE>>"


def cluster_dot(cluster: Cluster, title: str = "", story: dict | None = None) -> str:
    """DOT source for `cluster`; with `story`, the traced frame's path drawn in red."""
    highlighted = _highlighted_ports(story)
    lines = [
        "digraph tapnet {",
        f"  graph [fontname=Helvetica, fontsize=12, labelloc=t, compound=true, newrank=true, nodesep=0.4, ranksep=0.8, "
        f"label={_q(title or 'tapnet cluster')}];",
        "  node [fontname=Helvetica, fontsize=10, shape=plain];",
        "  edge [fontname=Helvetica, fontsize=9, dir=none];",
    ]
    ingress_network = next((n for n in cluster.networks.values() if n.ingress), None)
    publishing = [s for s in cluster.services.values() if s.ports]

    for node in cluster.nodes:
        lines.append(f"  subgraph {_q('cluster_' + node.name)} {{")
        lines.append(f'    label={_q(f"{node.name} (underlay {node.underlay_ip})")}; style=filled; fillcolor="{COLOUR_NODE}"; color="#999999";')
        host_rows = [
            ("eth0", f"eth0 {node.underlay_ip}/{cluster.underlay.prefixlen}, VTEP udp/{VXLAN_PORT}"),
            ("gwbridge", f"gwbridge {GWBRIDGE_SUBNET[1]}/{GWBRIDGE_SUBNET.prefixlen}"),
        ]
        host_ports = set()
        if f"{node.name}/vxlan" in highlighted or f"{node.name}/upstream" in highlighted:
            host_ports.add("eth0")
        if f"{node.name}/gwbridge" in highlighted:
            host_ports.add("gwbridge")
        lines.append(f"    {_host_id(node.name)} [label={_table('host namespace', node.name, host_rows, COLOUR_HOST, host_ports)}];")
        if ingress_network is not None and publishing:
            address = cluster.ingress_sbox_ips.get(node.name)
            rows = [("gwbridge", f"gwbridge {INGRESS_SBOX_GWBRIDGE_IP}")]
            if address is not None:
                rows.append(("ingress", f"{ingress_network.name} {address}"))
            fill = COLOUR_PATH_FILL if f"{node.name}/ingress-sbox" in highlighted else COLOUR_HOST
            lines.append(f"    {_ingress_sbox_id(node.name)} [label={_table('ingress-sbox', 'routing mesh (datapath)', rows, fill, set())}];")
        for sandbox in cluster.sandboxes_on(node.name):
            rows = []
            ports = set()
            for endpoint in sandbox.endpoints:
                network = cluster.networks[endpoint.network]
                rows.append((endpoint.ifname, f"{endpoint.ifname} {endpoint.ip}/{network.subnet.prefixlen} ({network.name})"))
                if f"{node.name}/{sandbox.name}/{endpoint.ifname}" in highlighted:
                    ports.add(endpoint.ifname)
            subtitle = f"service {sandbox.service}" + (f", gw {sandbox.default_gateway}" if sandbox.default_gateway else "")
            lines.append(f"    {_sandbox_id(sandbox.name)} [label={_table(sandbox.name, subtitle, rows, COLOUR_SANDBOX, ports)}];")
        for network in cluster.networks.values():
            if network.driver == "bridge" and network.node == node.name:
                lines.append(f"    {_network_id(network.name)} [{_network_style(network)}];")
                lines.extend("  " + line for line in _vip_nodes(cluster, network.name))
        lines.append("  }")

    for network in cluster.networks.values():
        if network.driver == "overlay":
            lines.append(f"  {_network_id(network.name)} [{_network_style(network)}];")
            lines.extend(_vip_nodes(cluster, network.name))

    for sandbox in cluster.sandboxes.values():
        for endpoint in sandbox.endpoints:
            lines.append(f"  {_sandbox_id(sandbox.name)}:{_q(endpoint.ifname)} -> {_network_id(endpoint.network)};")

    # Invisible edges put every network above the host namespaces that carry it, so the
    # sandboxes, networks and hosts stack from top to bottom as in libnetwork's pictures.
    for network in cluster.networks.values():
        for node in cluster.nodes:
            if network.driver == "overlay" or network.node == node.name:
                lines.append(f"  {_network_id(network.name)} -> {_host_id(node.name)} [style=invis];")

    lines.extend(_tunnel_lines(cluster))
    lines.extend(_ingress_lines(cluster, ingress_network, publishing))
    if story is not None:
        lines.extend(_path_lines(cluster, story))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _network_style(network) -> str:
    kind = network.driver
    if network.internal:
        kind += ", internal"
    if network.ingress:
        kind += ", ingress"
    text = f"{network.name}\n{kind}\n{network.subnet} gw {network.gateway}"
    if network.vni is not None:
        text += f"\nVNI {network.vni}"
    if network.internal:
        fill = COLOUR_INTERNAL
    elif network.driver == "overlay":
        fill = COLOUR_OVERLAY
    else:
        fill = COLOUR_BRIDGE
    return f'shape=box, style="rounded,filled", fillcolor="{fill}", label={_q(text)}'


def _tunnel_lines(cluster: Cluster) -> list[str]:
    vnis = sorted(n.vni for n in cluster.networks.values() if n.vni is not None)
    if not vnis:
        return []
    label = "VXLAN VNI " + ", ".join(str(v) for v in vnis)
    lines = []
    nodes = cluster.nodes
    for i, first in enumerate(nodes):
        for second in nodes[i + 1 :]:
            lines.append(
                f"  {_host_id(first.name)}:eth0 -> {_host_id(second.name)}:eth0 "
                f'[style=dashed, penwidth=2, color="#2e7d32", label={_q(label)}, constraint=false];'
            )
    for peer in cluster.external_peers:
        network = cluster.networks.get(peer.network)
        peer_id = _q(f"peer/{peer.vtep}")
        lines.append(f'  {peer_id} [shape=box, style="dashed", label={_q(f"external VTEP {peer.vtep}")}];')
        vni = network.vni if network is not None else "?"
        for node in nodes:
            lines.append(f'  {_host_id(node.name)}:eth0 -> {peer_id} [style=dashed, color="#2e7d32", label={_q(f"VNI {vni}: {peer.ip}")}];')
    return lines


def _vip_nodes(cluster: Cluster, network: str) -> list[str]:
    """Draw a diamond per service VIP on `network`, joined to the network by a dotted edge."""
    lines = []
    for service in cluster.services.values():
        vip = service.vips.get(network)
        if vip is None:
            continue
        label = _q(f"{service.name}\nVIP {vip}")
        lines.append(f'  {_vip_id(service.name, network)} [shape=diamond, style=filled, fillcolor="{COLOUR_VIP}", label={label}];')
        lines.append(f"  {_vip_id(service.name, network)} -> {_network_id(network)} [style=dotted];")
    return lines


def _ingress_lines(cluster: Cluster, ingress_network, publishing) -> list[str]:
    if ingress_network is None or not publishing:
        return []
    published = ", ".join(f"{p.published}->{s.name}:{p.target}/{p.protocol}" for s in publishing for p in s.ports if p.mode == "ingress")
    lines = []
    for node in cluster.nodes:
        if published:
            label = _q(f"published {published}\nDNAT to {INGRESS_SBOX_GWBRIDGE_IP}")
            lines.append(f'  {_host_id(node.name)}:eth0 -> {_host_id(node.name)}:gwbridge [dir=forward, color="#1565c0", constraint=false, label={label}];')
        lines.append(f'  {_host_id(node.name)}:gwbridge -> {_ingress_sbox_id(node.name)}:gwbridge [dir=forward, color="#1565c0", constraint=false];')
        lines.append(f'  {_ingress_sbox_id(node.name)}:ingress -> {_network_id(ingress_network.name)} [dir=forward, color="#1565c0", constraint=false, label="SNAT, DNAT to tasks"];')
    return lines


def _highlighted_ports(story: dict | None) -> set[str]:
    if story is None:
        return set()
    ports = set()
    for hop in story["hops"]:
        ports.add(hop["ingress"])
        ports.update(hop["egress"])
    return ports


def _path_lines(cluster: Cluster, story: dict) -> list[str]:
    """Red edges for each hop: from the port where the frame entered, through its network, to each port it left by."""
    lines = [f'  label={_q("trace " + str(story["id"]) + ": " + story["summary"])};']
    style = f'color="{COLOUR_PATH}", fontcolor="{COLOUR_PATH}", penwidth=2.5, dir=forward, constraint=false'
    previous_egress: list[str] = []
    for number, hop in enumerate(story["hops"], start=1):
        source = _port_node(cluster, hop["ingress"], lines)
        if hop["ingress"].endswith("/vxlan"):
            # The hop before sent the frame into the tunnel towards this VTEP.
            for sender in sorted({port for port in previous_egress if port.endswith("/vxlan")}):
                lines.append(f"  {_port_node(cluster, sender, lines)} -> {source} [{style}, style=dashed, label=\"VXLAN\"];")
        previous_egress = hop["egress"]
        # The network the frame crossed: the one of its sandbox port, where it entered or left.
        networks = [_port_network(cluster, port) for port in [hop["ingress"], *hop["egress"]]]
        network = next((name for name in networks if name is not None), None)
        if network is not None:
            lines.append(f"  {source} -> {_network_id(network)} [{style}, label={_q(str(number))}];")
            source = _network_id(network)
        if hop["verdict"] == "drop" or not hop["egress"]:
            drop = _q(f"drop/{story['id']}/{number}")
            text = f"drop: {hop['reason']}" if hop["verdict"] == "drop" else f"{hop['verdict'] or 'no verdict'}: no port"
            lines.append(f'  {drop} [shape=octagon, style=filled, fillcolor="{COLOUR_PATH_FILL}", color="{COLOUR_PATH}", label={_q(text)}];')
            lines.append(f"  {source} -> {drop} [{style}, label={_q(str(number))}];")
            continue
        for egress in hop["egress"]:
            target = _port_node(cluster, egress, lines)
            label = _q(f"{number} {hop['verdict']}")
            lines.append(f"  {source} -> {target} [{style}, label={label}];")
    return lines


def _port_network(cluster: Cluster, port: str) -> str | None:
    """Return the network of a sandbox port (`node/sandbox/ifname`), or None for other ports."""
    parts = port.split("/")
    if len(parts) != 3 or parts[1] not in cluster.sandboxes:
        return None
    for endpoint in cluster.sandboxes[parts[1]].endpoints:
        if endpoint.ifname == parts[2]:
            return endpoint.network
    return None


def _port_node(cluster: Cluster, port: str, lines: list[str]) -> str:
    """Return the DOT endpoint for a port, adding a plain node when the diagram has none for it."""
    endpoint = port_endpoint(port, cluster)
    if endpoint is None:
        endpoint = _q(f"port/{port}")
        lines.append(f'  {endpoint} [shape=box, style=dashed, label={_q(port)}];')
    return endpoint


def render(source: str, path: str | Path) -> Path:
    """Write `source` to `path`: as DOT for `.dot`, else laid out by Graphviz in the format of the suffix."""
    path = Path(path)
    kind = path.suffix.lstrip(".").lower()
    if kind in ("dot", "gv"):
        path.write_text(source)
        return path
    if kind not in RENDER_FORMATS:
        raise DiagramError(f"unsupported diagram format {path.suffix!r}: use .svg, .png, .pdf or .dot")
    dot = shutil.which("dot")
    if dot is None:
        raise DiagramError("Graphviz `dot` not found; install graphviz (scripts/setup.sh does) or write a .dot file")
    try:
        completed = subprocess.run([dot, f"-T{kind}", "-o", str(path)], input=source.encode(), capture_output=True, timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DiagramError(f"dot took longer than {DOT_TIMEOUT:g} s to lay out the diagram") from None
    if completed.returncode != 0:
        raise DiagramError(f"dot failed with status {completed.returncode}: {completed.stderr.decode(errors='replace').strip()}")
    return path
