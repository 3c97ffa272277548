"""A network namespace joined to this host by one veth pair, for tests where a host must disappear from
the network (no tests here). Debian's iproute2 (`ip netns`, `ip link ... type veth`), as root.

The pair gets a /30 of 10.231.0.0/16 that no interface of this host uses: the host's end holds .1, the
namespace's end .2. Nothing else is touched: no route of the host, no real interface; `destroy` removes
the pair and the namespace. A process started with `prefix()` (`ip netns exec NAME ...`) sees only the
namespace's loopback and its end of the pair, so it reaches servers that listen on `host_ip`; `cut()`
takes the host's end down (the namespace's packets vanish, as when a cable is pulled), `heal()` brings it
back.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time

NETWORK = ipaddress.ip_network("10.231.0.0/16")


def unavailable() -> str | None:
    """None, or why no namespace can be made here."""
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    return [ipaddress.ip_interface(line.split()[3]).network for line in out.splitlines() if len(line.split()) > 3]


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    subnets = list(NETWORK.subnets(new_prefix=30))
    start = os.getpid() % len(subnets)  # concurrent test runs start at different places
    for net in subnets[start:] + subnets[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /30 in {NETWORK}")


class Namespace:
    def __init__(self, tag: str):
        suffix = f"{tag}{os.getpid() % 100000}"
        self.name = f"stpm-{suffix}"
        self.host_if, self.ns_if = f"st{suffix}h"[:15], f"st{suffix}n"[:15]
        self.subnet: ipaddress.IPv4Network | None = None

    @property
    def host_ip(self) -> str:
        return str(self.subnet[1])

    @property
    def ns_ip(self) -> str:
        return str(self.subnet[2])

    def create(self) -> Namespace:
        self.subnet = _free_subnet()
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except Exception:
            self.destroy()
            raise
        return self

    def prefix(self) -> list[str]:
        """Run a command inside the namespace: prefix() + [command ...]."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        """Remove the pair and the namespace (the kernel frees them once no process is left inside)."""
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
        deadline = time.monotonic() + 10
        while _ip("link", "show", self.host_if, check=False).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
