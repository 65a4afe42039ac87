"""Network namespaces, TAP endpoints and their netlink configuration.

Python 3.11 has no `os.setns`, and `setns(2)` or `unshare(2)` with
CLONE_NEWNET changes only the calling thread. So every step that must happen
inside a sandbox runs in a short-lived thread of its own. That thread creates
or enters the namespace and opens the TAP devices there, so no tapnet link
ever exists in the root namespace. It then configures them over a netlink
socket opened from inside. The main thread never leaves the root namespace.

A TAP device lives as long as its file descriptor: closing the fd deletes the
link, and a namespace whose last process exits and whose mount is removed
takes its links with it. The kernel deletes TAP links of a dying namespace
instead of moving them to the root namespace, because tun devices have
rtnl_link_ops.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytun

from tapnet.model import Cluster, Sandbox, format_mac, mac_for_ip, port_name

log = logging.getLogger(__name__)

# Mount directory of named network namespaces (as `ip netns add` uses it), and
# the directory of per-namespace files that `ip netns exec` mounts over /etc.
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
TUN_DEVICE = Path("/dev/net/tun")

# Every namespace tapnet makes starts with this prefix (safety rule of the project).
NAME_PREFIX = "tn-"

# From linux/if_tun.h.
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUN_F_CSUM = 0x01  # the stack may hand us frames with a partial checksum
TUN_F_TSO4 = 0x02  # ... and TCP/IPv4 superframes (GSO)
TUN_F_TSO6 = 0x04  # ... and TCP/IPv6 superframes
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
VNET_HDR_SIZE = 10  # struct virtio_net_hdr, without num_buffers

# The underlay: a Linux bridge in the instance's underlay namespace, and one
# veth pair per host or client namespace (`veth<n>` on the bridge, where n is
# the address's offset in the underlay subnet, and `eth0` in the namespace).
UNDERLAY_BRIDGE = "br0"
UNDERLAY_IFNAME = "eth0"
UNDERLAY_MTU = 1500  # the Ethernet default; overlay endpoints get 1500 - 50

# From asm-generic/socket.h: set a socket buffer size above net.core.rmem_max
# and wmem_max (needs CAP_NET_ADMIN), so no sysctl has to change.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_NO_CHECK = 11  # asm-generic/socket.h: send UDP over IPv4 with checksum 0

# From linux/sockios.h and linux/ethtool.h: turn transmit checksum offload off.
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
IFNAMSIZ = 16

# From linux/sched.h and sys/mount.h.
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 0x100000
MNT_DETACH = 0x2

# Namespace names become file names under /run/netns; sandbox names are
# `<service>.<slot>`, so dots are allowed.
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Instance names longer than this are shortened in namespace names (prefix plus hash).
MAX_INSTANCE_PART = 12

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class NetnsError(Exception):
    """A namespace, TAP or netlink step failed; the message names the object."""


class NamespaceTaken(NetnsError):
    """The namespace name already exists and this instance did not create it now."""


@dataclass
class Tap:
    """One open TAP device: the endpoint `ifname` of `sandbox`, as a datapath port."""

    port: str  # `<node>/<sandbox>/<ifname>`
    sandbox: str
    ifname: str
    namespace: str
    device: pytun.TunTapDevice

    @property
    def fd(self) -> int:
        return self.device.fileno()

    def close(self) -> None:
        self.device.close()


def check_name_part(kind: str, value: str) -> None:
    """Raise ValueError unless `value` can be part of a namespace or file name."""
    if not _NAME_PART.match(value) or len(value) > 64:
        raise ValueError(
            f"invalid {kind} name {value!r}: use letters, digits, '.', '_' and '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )


def instance_part(instance: str) -> str:
    """Return the instance as it appears in namespace names, shortened but unique when long."""
    if len(instance) <= MAX_INSTANCE_PART:
        return instance
    digest = hashlib.sha256(instance.encode()).hexdigest()[:4]
    return f"{instance[: MAX_INSTANCE_PART - 5]}-{digest}"


def namespace_name(instance: str, sandbox: str) -> str:
    """Name the namespace of `sandbox`: `tn-<instance>-<sandbox>`."""
    return f"{NAME_PREFIX}{instance_part(instance)}-{sandbox}"


def host_namespace_name(instance: str, node: str) -> str:
    """Name the host namespace of `node`, which contains its VTEP: `tn-<instance>-host-<node>`."""
    return f"{NAME_PREFIX}{instance_part(instance)}-host-{node}"


def underlay_namespace_name(instance: str) -> str:
    """Name the namespace of the underlay bridge: `tn-<instance>-underlay`."""
    return f"{NAME_PREFIX}{instance_part(instance)}-underlay"


def client_namespace_name(instance: str, client: str) -> str:
    """Name the namespace of an `x-tapnet.clients` entry: `tn-<instance>-client-<name>`."""
    return f"{NAME_PREFIX}{instance_part(instance)}-client-{client}"


def namespace_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def namespace_identity(name: str) -> list[int] | None:
    """Return [st_dev, st_ino] of the mounted namespace `name`, or None when it does not exist.

    The pair identifies the namespace itself (an nsfs inode), so cleanup can
    tell the namespace it created from a later one that reuses the name.
    """
    try:
        st = os.stat(namespace_path(name))
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def _iproute():
    """Open a netlink route socket in the calling thread's namespace.

    pyroute2 takes about half a second to import, so client commands that
    never touch netlink do not import it.
    """
    from pyroute2 import IPRoute

    return IPRoute()


def _run_in_thread(function: Callable[[], T], what: str) -> T:
    """Run `function` in a new thread and return its result or re-raise its exception.

    Namespace changes stay confined to that thread, which exits afterwards.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"tapnet-netns {what}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise NetnsError(f"{what} failed: {os.strerror(code)} (errno {code})")


def _make_run_dir_shared() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does.

    Bind mounts of namespaces then propagate to mount namespaces that
    `ip netns exec` creates.
    """
    NETNS_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    run_dir = bytes(NETNS_RUN_DIR)
    if _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), f"bind mount of {NETNS_RUN_DIR}")
    _check(_libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None), f"making {NETNS_RUN_DIR} shared")


def _enter_namespace(name: str) -> None:
    """Move the calling thread into the namespace `name`."""
    fd = os.open(namespace_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"entering namespace {name}")
    finally:
        os.close(fd)


def _write_sysctl(key: str, value: str) -> None:
    """Write a net sysctl of the calling thread's namespace (used only inside tapnet's namespaces)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    path.write_text(value)


def create_namespace(name: str) -> list[int]:
    """Create and mount the network namespace `name` with `lo` up; return its identity.

    Raises NamespaceTaken when the name exists. On any other failure the
    half-made namespace is unmounted and its file removed.
    """
    if not name.startswith(NAME_PREFIX):
        raise ValueError(f"namespace name {name!r} must start with {NAME_PREFIX!r}")
    if namespace_identity(name) is not None:
        raise NamespaceTaken(f"namespace {name} already exists and is not this instance's; remove it or pick another --instance")

    def build() -> list[int]:
        _make_run_dir_shared()
        path = namespace_path(name)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        except FileExistsError:
            raise NamespaceTaken(f"namespace {name} already exists; remove it or pick another --instance") from None
        try:
            _check(_libc.unshare(CLONE_NEWNET), f"unshare for namespace {name}")
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", MS_BIND, None),
                f"mounting namespace {name}",
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise

        # Docker disables IPv6 on container interfaces when no network has IPv6;
        # tapnet's networks are IPv4 only, so interfaces created later start disabled.
        _write_sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        _write_sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        with _iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return namespace_identity(name)  # type: ignore[return-value]

    try:
        identity = _run_in_thread(build, name)
    except NamespaceTaken:
        raise
    except BaseException:
        if namespace_identity(name) is not None:
            remove_namespace(name)
        raise
    log.info("created namespace %s", name)
    return identity


def remove_namespace(name: str, identity: list[int] | None = None) -> bool:
    """Unmount and delete the namespace `name`; return False when it was absent or not ours.

    With `identity` given, a namespace of that name that is not the recorded
    one (another object reusing the name) is left alone.
    """
    if not name.startswith(NAME_PREFIX):
        raise ValueError(f"refusing to remove namespace {name!r}: not a tapnet name ({NAME_PREFIX}*)")
    current = namespace_identity(name)
    if current is None:
        return False
    if identity is not None and list(current) != list(identity):
        log.warning("namespace %s is not the one this instance created (identity %s, recorded %s); left alone", name, current, identity)
        return False
    path = bytes(namespace_path(name))
    if _libc.umount2(path, MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code != errno.EINVAL:  # EINVAL: not a mount point (creation stopped half-way)
            log.warning("unmounting namespace %s failed: %s", name, os.strerror(code))
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    log.info("removed namespace %s", name)
    return True


def pids_in_namespace(identity: list[int]) -> list[int]:
    """Return the PIDs of every process whose network namespace has `identity`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if [st.st_dev, st.st_ino] == list(identity):
            pids.append(int(entry))
    return pids


def _open_tap(ifname: str) -> pytun.TunTapDevice:
    device = pytun.TunTapDevice(name=ifname, flags=TAP_FLAGS)
    try:
        fd = device.fileno()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, VNET_HDR_SIZE.to_bytes(4, "little"))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS)
        os.set_blocking(fd, False)
    except BaseException:
        device.close()
        raise
    return device


def create_endpoints(namespace: str, sandbox: Sandbox, cluster: Cluster) -> list[Tap]:
    """Open one TAP per endpoint inside `namespace` and configure it like a Docker endpoint.

    Each TAP gets its MAC, IPv4 address, MTU and state up; the sandbox gets a
    default route via its default gateway when it has one. On failure every
    TAP opened so far is closed (which deletes it).
    """

    def build() -> list[Tap]:
        _enter_namespace(namespace)
        taps: list[Tap] = []
        try:
            for endpoint in sandbox.endpoints:
                device = _open_tap(endpoint.ifname)
                taps.append(Tap(port_name(sandbox.node, sandbox.name, endpoint.ifname), sandbox.name, endpoint.ifname, namespace, device))

            with _iproute() as ipr:
                for endpoint in sandbox.endpoints:
                    index = ipr.link_lookup(ifname=endpoint.ifname)[0]
                    ipr.link("set", index=index, address=format_mac(endpoint.mac), mtu=endpoint.mtu)
                    prefix = cluster.networks[endpoint.network].subnet.prefixlen
                    ipr.addr("add", index=index, address=str(endpoint.ip), prefixlen=prefix)
                    ipr.link("set", index=index, state="up")
                if sandbox.default_gateway is not None:
                    ipr.route("add", dst="default", gateway=str(sandbox.default_gateway))
        except BaseException:
            for tap in taps:
                tap.close()
            raise
        return taps

    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return _run_in_thread(build, namespace)
    except (OSError, pytun.Error, NetlinkError, KeyError) as error:
        raise NetnsError(f"creating endpoints of sandbox {sandbox.name} in {namespace} failed: {error}") from error


def underlay_port_name(ip: ipaddress.IPv4Address, underlay: ipaddress.IPv4Network) -> str:
    """Name the bridge end of the veth pair for underlay address `ip`: `veth<offset in the subnet>`."""
    return f"veth{int(ip) - int(underlay.network_address)}"


def create_underlay_bridge(namespace: str, address: ipaddress.IPv4Interface) -> None:
    """Create the underlay bridge `br0` in `namespace` with `address` (the underlay's `.1`) and bring it up.

    The bridge's MAC is derived from its address like every other tapnet MAC.
    STP stays off (the kernel default), so ports forward as soon as they are up.
    """

    def build() -> None:
        _enter_namespace(namespace)
        with _iproute() as ipr:
            ipr.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
            index = ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
            ipr.link("set", index=index, address=format_mac(mac_for_ip(address.ip)), mtu=UNDERLAY_MTU)
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            ipr.link("set", index=index, state="up")

    _run_netlink(build, namespace, f"creating the underlay bridge {UNDERLAY_BRIDGE} in {namespace}")


def join_underlay(underlay_namespace: str, namespace: str, address: ipaddress.IPv4Interface) -> str:
    """Join `namespace` to the underlay bridge by a veth pair and return the bridge end's name.

    The pair is created inside the underlay namespace with its other end
    placed straight into `namespace` as `eth0`, so neither end ever exists in
    the root namespace. `eth0` gets `address`, the MAC `02:42` + its IPv4
    bytes and MTU 1500. The namespace gets no default route, so nothing in it
    can reach beyond the underlay.
    """
    bridge_port = underlay_port_name(address.ip, address.network)

    def plug() -> None:
        _enter_namespace(underlay_namespace)
        with _iproute() as ipr:
            ipr.link(
                "add",
                ifname=bridge_port,
                kind="veth",
                peer={"ifname": UNDERLAY_IFNAME, "net_ns_fd": str(namespace_path(namespace))},
            )
            index = ipr.link_lookup(ifname=bridge_port)[0]
            bridge = ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
            ipr.link("set", index=index, master=bridge, mtu=UNDERLAY_MTU)
            ipr.link("set", index=index, state="up")

    def configure() -> None:
        _enter_namespace(namespace)
        with _iproute() as ipr:
            index = ipr.link_lookup(ifname=UNDERLAY_IFNAME)[0]
            ipr.link("set", index=index, address=format_mac(mac_for_ip(address.ip)), mtu=UNDERLAY_MTU)
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            ipr.link("set", index=index, state="up")
        _disable_tx_checksum_offload(UNDERLAY_IFNAME)

    _run_netlink(plug, underlay_namespace, f"creating veth {bridge_port} from {underlay_namespace} to {namespace}")
    _run_netlink(configure, namespace, f"configuring {UNDERLAY_IFNAME} {address} in {namespace}")
    return bridge_port


def _disable_tx_checksum_offload(ifname: str) -> None:
    """Make the kernel complete checksums before `ifname` transmits, as `ethtool -K IFNAME tx off` does.

    A veth passes packets with a partial checksum (CHECKSUM_PARTIAL) on to
    the next namespace, where a NIC would have completed it on the wire. A
    kernel VXLAN device over such a veth therefore sends inner TCP segments
    whose checksum is only the pseudo-header sum. A UDP socket receives that
    payload without the "partial" mark, so tapnet would deliver a segment the
    receiving sandbox drops as corrupt. Turning transmit checksum offload off
    on every underlay `eth0` makes the sender's kernel complete the checksum.
    """
    request = ctypes.create_string_buffer(struct.pack("=II", ETHTOOL_STXCSUM, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack(f"{IFNAMSIZ}sP", ifname.encode(), ctypes.addressof(request))  # struct ifreq, native layout
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def open_udp_socket(namespace: str, address: str, port: int, buffer_bytes: int, checksum: bool = True) -> socket.socket:
    """Open a non-blocking UDP socket bound to (`address`, `port`) inside `namespace`.

    A socket belongs to the namespace it was created in for its whole life,
    so the returned socket sends and receives on that namespace's links from
    any thread. Port 0 binds an ephemeral port. Both buffers are set to
    `buffer_bytes`, so a burst of datagrams waits in the kernel instead of
    being dropped while the event loop is busy. With `checksum` False the
    socket sends UDP checksum 0.
    """

    def build() -> socket.socket:
        _enter_namespace(namespace)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, buffer_bytes)
            if not checksum:
                sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            sock.bind((address, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    try:
        return _run_in_thread(build, namespace)
    except OSError as error:
        raise NetnsError(f"opening UDP socket {address}:{port} in {namespace} failed: {error}") from error


def _run_netlink(function: Callable[[], None], namespace: str, what: str) -> None:
    """Run a netlink step in a thread of `namespace`, raising NetnsError that names `what` on failure."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        _run_in_thread(function, namespace)
    except (OSError, NetlinkError, IndexError) as error:
        raise NetnsError(f"{what} failed: {error}") from error


def resolver_address(cluster: Cluster, sandbox: Sandbox) -> ipaddress.IPv4Address | None:
    """Return the gateway of the sandbox's first network that is not ingress (its DNS resolver)."""
    for endpoint in sandbox.endpoints:
        network = cluster.networks[endpoint.network]
        if not network.ingress:
            return network.gateway
    return None


def write_etc_files(namespace: str, sandbox: Sandbox, cluster: Cluster) -> Path:
    """Write /etc/netns/<namespace>/resolv.conf and hosts, which `ip netns exec` mounts over /etc."""
    directory = ETC_NETNS_DIR / namespace
    directory.mkdir(parents=True, exist_ok=True)

    resolver = resolver_address(cluster, sandbox)
    # Docker's resolv.conf for the embedded DNS: one nameserver, ndots 0.
    lines = [f"nameserver {resolver}"] if resolver is not None else []
    lines.append("options ndots:0")
    (directory / "resolv.conf").write_text("\n".join(lines) + "\n")

    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for endpoint in sandbox.endpoints:
        hosts.append(f"{endpoint.ip}\t{sandbox.name}")
    (directory / "hosts").write_text("\n".join(hosts) + "\n")
    return directory


def remove_etc_dir(path: str | Path) -> bool:
    """Delete an /etc/netns/tn-* directory that tapnet wrote; return False when absent."""
    path = Path(path)
    if path.parent != ETC_NETNS_DIR or not path.name.startswith(NAME_PREFIX):
        raise ValueError(f"refusing to remove {path}: not an {ETC_NETNS_DIR}/{NAME_PREFIX}* directory")
    if not path.is_dir():
        return False
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
    return True


def spawn_in_namespace(namespace: str, argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start `argv` inside `namespace` in its own session, output appended to `log_path`.

    `ip netns exec` also mounts /etc/netns/<namespace>/* over /etc, so the
    program reads the sandbox's resolv.conf and hosts.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )


def root_networks() -> list[ipaddress.IPv4Network]:
    """Return the IPv4 networks of every address in the root namespace.

    The main thread never leaves the root namespace, so a netlink socket it
    opens belongs to the root namespace. Only IPv4 is returned, because tapnet's
    subnets are IPv4.
    """
    networks = []
    with _iproute() as ipr:
        for message in ipr.get_addr(family=2):  # AF_INET
            address = message.get_attr("IFA_ADDRESS") or message.get_attr("IFA_LOCAL")
            interface = ipaddress.ip_interface(f"{address}/{message['prefixlen']}")
            if interface.network not in networks:
                networks.append(interface.network)
    return networks


def check_host_support() -> None:
    """Raise NetnsError unless this process can create namespaces and TAP devices."""
    if os.geteuid() != 0:
        raise NetnsError("tapnet start needs root (namespaces and TAP devices); run it with sudo")
    if not TUN_DEVICE.exists():
        raise NetnsError(f"{TUN_DEVICE} is missing; load the tun module (modprobe tun) and try again")
