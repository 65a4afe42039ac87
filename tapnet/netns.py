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
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytun

from tapnet.model import Cluster, Sandbox, format_mac, port_name

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
