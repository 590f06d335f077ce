"""A network-namespace test bed: a "public" network with NATed home networks behind routers.

    inet (namespace with bridge br0, 198.18.0.0/24)
      ├── public host i           198.18.0.(10+i)
      └── router j  wan 198.18.0.(100+j)   lan br0 198.19.j.1/24, nftables masquerade + stateful firewall
            └── home host k       198.19.j.(10+k), default route via 198.19.j.1

Public hosts have no route to 198.19.0.0/16, and a router forwards from its WAN only packets of
connections opened from inside: a home host dials out, nobody dials in (what a home router does).
Links can be shaped with `tc tbf` (netem is not in this kernel, so no latency or loss).

Only the benchmarking range 198.18.0.0/15 is used. `NetnsBed.close()` kills the processes it started,
deletes every namespace (which destroys their veths) and is safe to call twice; use it in a finally, or
`open_bed()` as a context manager. `skip_reason()` says why a machine cannot run the bed (not root, no
`ip netns`, no `nft`); tests turn it into a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from p2p_node_proc import NodeProcess

PUBLIC_NET = "198.18.0"
HOME_NET = "198.19"
NODE_SCRIPT = Path(__file__).with_name("netns_node.py")
_counter = itertools.count()


def skip_reason() -> str | None:
    """Why this machine cannot build the bed, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    probe = f"snprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns add` failed: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _run(*args: str, ns: str | None = None, stdin: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


@dataclass(slots=True)
class Endpoint:
    name: str
    ns: str
    ip: str
    router: Router | None = None  # None for a public host


@dataclass(slots=True)
class Router:
    name: str
    ns: str
    wan_ip: str
    index: int
    homes: list[Endpoint] = field(default_factory=list)


class NetnsBed:
    def __init__(self, tag: str | None = None) -> None:
        # Namespace and interface names are global to the machine: a short, unique prefix per bed.
        self.tag = tag or f"sn{os.getpid() % 10000:04d}{next(_counter)}"
        self.namespaces: list[str] = []
        self.nodes: list[NodeProcess] = []
        self.public: list[Endpoint] = []
        self.routers: list[Router] = []
        self._links = itertools.count()
        self.inet = self._namespace("inet")
        _run("ip", "link", "add", "br0", "type", "bridge", ns=self.inet)
        _run("ip", "link", "set", "br0", "up", ns=self.inet)

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "link", "set", "lo", "up", ns=ns)
        return ns

    def _veth(self, ns_a: str, name_a: str, ns_b: str, bridge_b: str) -> None:
        """A veth pair: `name_a` in ns_a, its peer enslaved to `bridge_b` in ns_b."""
        peer = f"{self.tag}v{next(self._links)}"[-15:]
        _run("ip", "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", peer, "netns", ns_b)
        _run("ip", "link", "set", peer, "master", bridge_b, "up", ns=ns_b)

    def add_public(self, name: str) -> Endpoint:
        ns = self._namespace(name)
        ip = f"{PUBLIC_NET}.{10 + len(self.public)}"
        self._veth(ns, "eth0", self.inet, "br0")
        _run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _run("ip", "link", "set", "eth0", "up", ns=ns)
        endpoint = Endpoint(name=name, ns=ns, ip=ip)
        self.public.append(endpoint)
        return endpoint

    def add_router(self, name: str, *, stealth: bool = True) -> Router:
        """A home router. `stealth`: unsolicited packets to the router itself are dropped (most home routers);
        otherwise its kernel answers a SYN to a closed port with a RST, as a bare Linux box does."""
        index = len(self.routers) + 1
        ns = self._namespace(name)
        wan_ip = f"{PUBLIC_NET}.{100 + index}"
        lan = f"{HOME_NET}.{index}"
        self._veth(ns, "wan", self.inet, "br0")
        _run("ip", "addr", "add", f"{wan_ip}/24", "dev", "wan", ns=ns)
        _run("ip", "link", "set", "wan", "up", ns=ns)
        _run("ip", "link", "add", "br0", "type", "bridge", ns=ns)
        _run("ip", "addr", "add", f"{lan}.1/24", "dev", "br0", ns=ns)
        _run("ip", "link", "set", "br0", "up", ns=ns)
        _run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=ns)
        # Masquerade out of the WAN; from the WAN forward only replies to connections opened inside.
        rules = f"""
table ip nat {{
  chain masq {{ type nat hook postrouting priority 100; oifname "wan" ip saddr {lan}.0/24 masquerade; }}
}}
table ip filter {{
  chain inbound {{
    type filter hook forward priority 0; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }}
  chain wan_in {{
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state established,related accept
    {'iifname "wan" drop' if stealth else ""}
  }}
}}
"""
        _run("nft", "-f", "-", ns=ns, stdin=rules)
        router = Router(name=name, ns=ns, wan_ip=wan_ip, index=index)
        self.routers.append(router)
        return router

    def add_home(self, router: Router, name: str) -> Endpoint:
        ns = self._namespace(name)
        ip = f"{HOME_NET}.{router.index}.{10 + len(router.homes)}"
        self._veth(ns, "eth0", router.ns, "br0")
        _run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _run("ip", "link", "set", "eth0", "up", ns=ns)
        _run("ip", "route", "add", "default", "via", f"{HOME_NET}.{router.index}.1", ns=ns)
        endpoint = Endpoint(name=name, ns=ns, ip=ip, router=router)
        router.homes.append(endpoint)
        return endpoint

    def shape(self, where: Endpoint | Router, rate: str = "20mbit", burst: str = "64kb") -> None:
        """Token-bucket rate limit on the link out of a host (eth0) or a router's uplink (wan)."""
        dev = "wan" if isinstance(where, Router) else "eth0"
        _run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms",
             ns=where.ns)  # fmt: skip

    def cut(self, where: Endpoint) -> None:
        """Unplug a public host's link: its peers get no FIN or RST, as when a machine loses power."""
        _run("ip", "link", "set", "eth0", "down", ns=where.ns)

    def start_node(self, where: Endpoint, data_dir: Path, **options: object) -> NodeProcess:
        node = start_netns_node(where, data_dir, **options)
        self.nodes.append(node)
        return node

    def tcp_connects(self, src: Endpoint, ip: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a plain TCP connect from `src` to ip:port succeeds (bash's /dev/tcp, no extra tools)."""
        cmd = [
            "ip",
            "netns",
            "exec",
            src.ns,
            "timeout",
            str(timeout),
            "bash",
            "-c",
            f"exec 3<>/dev/tcp/{ip}/{port}",
        ]
        return subprocess.run(cmd, capture_output=True, timeout=timeout + 5).returncode == 0

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        self.nodes.clear()
        for ns in reversed(self.namespaces):
            # Anything still running inside (a node's children) goes with its namespace.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()


@contextlib.contextmanager
def open_bed(tag: str | None = None) -> Iterator[NetnsBed]:
    bed = NetnsBed(tag)
    try:
        yield bed
    finally:
        bed.close()


class NetnsNode(NodeProcess):
    """`tests/netns_node.py` inside a namespace, driven like `NodeProcess` (JSON lines on stdin/stdout)."""

    def __init__(
        self, where: Endpoint, data_dir: Path, *, start_timeout: float = 40.0, **options: object
    ) -> None:
        import queue
        import threading

        self.data_dir = Path(data_dir)
        self.where = where
        cmd = ["ip", "netns", "exec", where.ns, sys.executable, str(NODE_SCRIPT), "--data-dir", str(data_dir)]
        cmd += ["--listen-host", where.ip]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd += [flag] if value else []
            elif isinstance(value, list | tuple):
                for item in value:
                    cmd += [flag, str(item)]
            elif value is not None:
                cmd += [flag, str(value)]
        self.started_at = time.time()
        # `ip netns exec` execs the command: the pid is the node's own.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self._next_id = 0
        ready = self._wait_for(lambda m: m.get("event") == "ready", start_timeout)
        self.peer_id = ready["peer_id"]
        self.addr = ready["addrs"][0]


def start_netns_node(where: Endpoint, data_dir: Path, **options: object) -> NetnsNode:
    return NetnsNode(where, data_dir, **options)
