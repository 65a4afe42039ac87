#!/usr/bin/env bash
# Set up tapnet on a Debian machine, as root: Debian tools, a virtual
# environment with tapnet installed in it, and a launcher in /usr/local/bin so
# that `sudo tapnet ...` works although sudo resets PATH.
#
# Safe to run again; it only installs what is missing.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and /usr/local/bin/tapnet)" >&2
    exit 1
fi

# Debian packages the demo, the tests and the benchmarks use. dnsmasq-base
# and not dnsmasq: the latter starts a DNS server in the root namespace.
packages=(
    sudo iproute2 nftables iputils-ping dnsutils curl procps
    tcpdump tshark iperf3 vde2 dnsperf dnsmasq-base graphviz
    python3 python3-venv python3-dev gcc
)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    listening_before=$(ss -H -ltnu 2>/dev/null | awk '{print $5}' | sort || true)
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    listening_after=$(ss -H -ltnu 2>/dev/null | awk '{print $5}' | sort || true)
    new=$(comm -13 <(echo "$listening_before") <(echo "$listening_after") | grep -v '^$' || true)
    if [ -n "$new" ]; then
        echo "setup.sh: warning: a package left a server listening in the root namespace: $new" >&2
    fi
fi

# Debian's own Python, so that the virtual environment also works for users
# who cannot read root's home (where tools such as pyenv put theirs).
if [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ]; then
    python=/usr/bin/python3
else
    python=${PYTHON:-python3}
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"

cat > /usr/local/bin/tapnet <<LAUNCHER
#!/bin/sh
exec "$here/.venv/bin/tapnet" "\$@"
LAUNCHER
chmod 755 /usr/local/bin/tapnet

# Compile and cache the numba functions once, so the first start is fast.
.venv/bin/python -m tapnet.warmup
echo "setup.sh: ready; try 'sudo tapnet start' or '.venv/bin/python -m pytest'"
