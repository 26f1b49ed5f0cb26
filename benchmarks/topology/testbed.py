"""A two-node testbed on one machine: two network namespaces joined by a shaped veth pair.

    with Testbed(plan(rate_bps=1e9, delay_ms=1.0)) as tb:
        before = tb.counters()
        ...  # start one torchrun per node: tb.exec_prefix(i) + [...], tb.node_env(i)
        traffic = tb.counters() - before
        traffic.cross_node_bytes, traffic.intra_node_bytes

Each namespace (``leo_topo_<pid>_n<i>``, made with the slow-link harness's
:class:`benchmarks.slow_link.netns.Namespace`) is one "node": its own unshaped ``lo`` carries the
traffic between the ranks of that node (a rank talking to its own node's veth address is routed
over ``lo`` by the kernel), and one end of a veth pair carries everything between the nodes. The
veth gets a private address on each end (default 10.213.0.1/30 and 10.213.0.2/30); these exist
only inside the two namespaces, so nothing outside them is ever addressed. Both veth ends are
shaped with ``netns.shape(dev=...)`` (tbf at the rate, behind netem for the delay), so each
direction of the link is limited like a full-duplex inter-node link.

Counters (``/proc/net/dev`` of each namespace, tx side):
- cross-node bytes = tx of veth end 0 + tx of veth end 1 (both directions of the link);
- intra-node bytes of node i = tx of node i's ``lo`` (loopback counts each byte once as tx).

Leaving the ``with`` block deletes both namespaces, which deletes the veth pair with them — also
after an exception or Ctrl-C. Everything but the root-only context manager (names, addresses,
parsing, counter arithmetic) is pure Python and unit-tested without root (tests/test_topology.py).
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW_LINK = os.path.join(os.path.dirname(HERE), "slow_link")
if SLOW_LINK not in sys.path:
    sys.path.insert(0, SLOW_LINK)

import netns  # noqa: E402  (benchmarks/slow_link/netns.py)

__all__ = ["Node", "Plan", "plan", "parse_proc_net_dev", "Snapshot", "Traffic", "Testbed", "can_create",
           "DEFAULT_SUBNET", "RDZV_PORT", "hosts_file", "snapshot", "parse_tcp_retrans", "netem_available", "run_on_nodes", "nodes_to_env", "nodes_from_env"]

DEFAULT_SUBNET = "10.213.0.0/30"
RDZV_PORT = 29400
ETC_NETNS = "/etc/netns"
_IFNAMSIZ = 15  # longest Linux interface name


@dataclass(frozen=True)
class Node:
    index: int
    netns: str      # namespace name
    veth: str       # this node's end of the veth pair (inside its namespace)
    addr: str       # this node's address on the veth
    prefixlen: int
    hostname: str = ""  # resolves to ``addr`` inside the testbed's namespaces (their /etc/hosts)

    @property
    def cidr(self) -> str:
        return f"{self.addr}/{self.prefixlen}"


@dataclass(frozen=True)
class Plan:
    nodes: tuple[Node, ...]
    rate_bps: float | None = None   # None: veth unshaped
    delay_ms: float = 0.0

    @property
    def rdzv_host(self) -> str:
        """Node 0's veth address: where the c10d rendezvous listens."""
        return self.nodes[0].addr

    def rdzv_endpoint(self, port: int = RDZV_PORT, by_name: bool = False) -> str:
        """``host:port`` of the rendezvous on node 0, by address or by its testbed host name."""
        return f"{self.nodes[0].hostname if by_name else self.rdzv_host}:{port}"


def hosts_file(base: str, nodes: tuple[Node, ...]) -> str:
    """The machine's /etc/hosts plus one line per node: what ``ip netns exec`` shows the namespaces
    as /etc/hosts (it bind-mounts /etc/netns/<name>/hosts), so node names resolve there, and
    the veth addresses resolve back to names, without touching the machine's own /etc/hosts."""
    lines = [base.rstrip("\n"), "# leo_dist topology testbed"] if base.strip() else ["# leo_dist topology testbed"]
    lines += [f"{n.addr} {n.hostname}" for n in nodes]
    return "\n".join(lines) + "\n"


def plan(tag: str | int | None = None, subnet: str = DEFAULT_SUBNET, rate_bps: float | str | None = None,
         delay_ms: float = 0.0, n_nodes: int = 2) -> Plan:
    """Names and addresses of a testbed; ``tag`` (default: this pid) makes the namespace names unique.

    The subnet must be private (RFC 1918) and hold an address per node: the addresses are assigned
    inside the testbed's namespaces only, so only they (and loopback) are ever talked to.
    """
    if n_nodes != 2:
        raise ValueError("a veth pair joins exactly two nodes")
    tag = os.getpid() if tag is None else tag
    if not str(tag).replace("_", "").isalnum():
        raise ValueError(f"tag {tag!r}: letters, digits and '_' only")
    net = ipaddress.ip_network(subnet, strict=True)
    if net.version != 4 or not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise ValueError(f"subnet {subnet}: use a private IPv4 network such as 10.213.0.0/30")
    hosts = list(net.hosts()) if net.num_addresses <= 1024 else [net.network_address + 1, net.network_address + 2]
    if len(hosts) < n_nodes:
        raise ValueError(f"subnet {subnet} has {len(hosts)} host address(es), need {n_nodes}")
    if isinstance(rate_bps, str):
        rate_bps = netns.parse_rate(rate_bps)
    if delay_ms < 0:
        raise ValueError(f"delay must be >= 0 ms, got {delay_ms}")
    nodes = []
    for i in range(n_nodes):
        veth = f"ltb{i}"
        assert len(veth) <= _IFNAMSIZ
        nodes.append(Node(i, f"leo_topo_{tag}_n{i}", veth, str(hosts[i]), net.prefixlen,
                          f"leo-topo-{str(tag).replace('_', '-')}-n{i}"))
    return Plan(tuple(nodes), rate_bps, float(delay_ms))


def parse_proc_net_dev(text: str) -> dict[str, dict[str, int]]:
    """``/proc/net/dev`` -> {interface: {rx_bytes, rx_packets, tx_bytes, tx_packets}}."""
    out = {}
    for line in text.splitlines():
        if ":" not in line or line.lstrip().startswith(("Inter-", "face")):
            continue
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) < 10:
            continue
        out[name.strip()] = dict(rx_bytes=int(fields[0]), rx_packets=int(fields[1]),
                                 tx_bytes=int(fields[8]), tx_packets=int(fields[9]))
    return out


@dataclass(frozen=True)
class Snapshot:
    """tx byte counters at one moment: each node's veth end, and each node's ``lo``; with each
    node's TCP retransmissions and the drops of its veth's qdiscs (both 0 when not read)."""
    veth_tx: tuple[int, ...]
    lo_tx: tuple[int, ...]
    tcp_retrans: tuple[int, ...] = ()
    qdisc_drops: tuple[int, ...] = ()

    @classmethod
    def from_proc(cls, texts: list[str], nodes: tuple[Node, ...], tcp_retrans: tuple[int, ...] = (),
                  qdisc_drops: tuple[int, ...] = ()) -> "Snapshot":
        parsed = [parse_proc_net_dev(t) for t in texts]
        missing = [f"{n.netns}:{dev}" for n, p in zip(nodes, parsed) for dev in (n.veth, "lo") if dev not in p]
        if missing:
            raise RuntimeError(f"interfaces missing from /proc/net/dev: {missing}")
        return cls(tuple(p[n.veth]["tx_bytes"] for n, p in zip(nodes, parsed)),
                   tuple(p["lo"]["tx_bytes"] for p in parsed), tuple(tcp_retrans), tuple(qdisc_drops))

    def __sub__(self, before: "Snapshot") -> "Traffic":
        if len(self.veth_tx) != len(before.veth_tx):
            raise ValueError("snapshots of different testbeds")
        diff = lambda a, b: tuple(x - y for x, y in zip(a, b))  # noqa: E731
        return Traffic(diff(self.veth_tx, before.veth_tx), diff(self.lo_tx, before.lo_tx),
                       sum(diff(self.tcp_retrans, before.tcp_retrans)), sum(diff(self.qdisc_drops, before.qdisc_drops)))

    def to_json(self) -> dict:
        return {k: list(v) for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "Snapshot":
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class Traffic:
    """Bytes between two snapshots: per veth end (direction node i -> other) and per node's ``lo``."""
    veth_tx: tuple[int, ...]
    lo_tx: tuple[int, ...]
    tcp_retrans: int = 0
    qdisc_drops: int = 0

    @property
    def cross_node_bytes(self) -> int:
        """Bytes that crossed between the nodes, both directions summed."""
        return sum(self.veth_tx)

    @property
    def intra_node_bytes(self) -> tuple[int, ...]:
        """Bytes that stayed inside each node (its loopback)."""
        return self.lo_tx

    def per_step(self, steps: int) -> dict:
        if steps <= 0:
            raise ValueError("steps must be positive")
        return dict(cross_node_bytes=self.cross_node_bytes / steps,
                    intra_node_bytes=[b / steps for b in self.lo_tx],
                    intra_node_bytes_total=sum(self.lo_tx) / steps,
                    veth_tx_bytes=[b / steps for b in self.veth_tx], tcp_retrans=self.tcp_retrans,
                    qdisc_drops=self.qdisc_drops)


def can_create() -> str | None:
    """None when this machine can build a testbed, else why not (for pytest skips)."""
    import shutil
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and shapes a veth pair with tc)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"needs the iproute2 tools {missing}"
    probe = f"leo_topo_probe_{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (link delay); probed in a throwaway namespace."""
    probe = f"leo_topo_netem_{os.getpid()}"
    with netns.Namespace(probe):
        res = netns._run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], probe, check=False)
    return res.returncode == 0


def run_on_nodes(tb: "Testbed", argv: list[list[str]], env: list[dict[str, str]], logs: list[str],
                 timeout: float) -> list[int | None]:
    """Start ``argv[i]`` inside node i (all at once, each in its own session), its output to
    ``logs[i]``; wait for all with one deadline. Returns each exit code, None for one still running
    at the deadline, which is killed with its whole process group (its own children only)."""
    import signal
    import time
    procs = []
    try:
        for i, (cmd, extra, log) in enumerate(zip(argv, env, logs)):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(tb.exec_prefix(i) + cmd, env={**os.environ, **extra}, stdout=f,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def _run(cmd: list[str], ns: str | None = None) -> str:
    return netns._run(cmd, ns).stdout


class Testbed:
    """``with Testbed(plan(...)) as tb:`` two namespaces + a shaped veth pair; all removed on exit."""

    def __init__(self, p: Plan | None = None):
        self.plan = p or plan()
        self.nodes = self.plan.nodes
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Testbed":
        netns.require_root()
        stack = contextlib.ExitStack()
        try:
            for node in self.nodes:
                stack.enter_context(netns.Namespace(node.netns))
                stack.callback(self._write_hosts(node))
            a, b = self.nodes
            # Made inside the namespaces directly: the pair never exists in the caller's namespace,
            # and deleting the namespaces deletes it.
            _run(["ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth, "netns", b.netns], a.netns)
            for node in self.nodes:
                _run(["ip", "addr", "add", node.cidr, "dev", node.veth], node.netns)
                _run(["ip", "link", "set", node.veth, "up"], node.netns)
            if self.plan.rate_bps:
                self.shape(self.plan.rate_bps, self.plan.delay_ms)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _write_hosts(self, node: Node):
        """Write /etc/netns/<ns>/hosts; return the function that removes it again."""
        d = os.path.join(ETC_NETNS, node.netns)
        try:
            with open("/etc/hosts") as f:
                base = f.read()
        except OSError:
            base = "127.0.0.1 localhost\n"
        for attempt in range(3):  # another testbed may remove an empty /etc/netns meanwhile
            try:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "hosts"), "w") as f:
                    f.write(hosts_file(base, self.nodes))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise

        def remove() -> None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(d, "hosts"))
            with contextlib.suppress(OSError):
                os.rmdir(d)
            with contextlib.suppress(OSError):
                os.rmdir(ETC_NETNS)  # only when empty: never another namespace's files
        return remove

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- use
    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[i].netns]

    def node_env(self, i: int) -> dict[str, str]:
        """Environment for processes of node i: gloo on its veth end, one thread per rank."""
        return dict(GLOO_SOCKET_IFNAME=self.nodes[i].veth, OMP_NUM_THREADS="1")

    def shape(self, rate_bps: float, delay_ms: float = 0.0) -> None:
        """Shape both veth ends (each direction of the link) to ``rate_bps`` + ``delay_ms``."""
        for node in self.nodes:
            try:
                netns.shape(rate_bps, delay_ms, netns=node.netns, dev=node.veth)
            except RuntimeError as exc:
                if delay_ms > 0 and "netem" in str(exc) and "unknown" in str(exc):
                    raise RuntimeError(f"this kernel has no netem qdisc (sch_netem), so no delay can be added "
                                       f"to the link: use a delay of 0 ms here. ({exc})") from exc
                raise

    def unshape(self) -> None:
        for node in self.nodes:
            netns.unshape(node.netns, dev=node.veth)

    def counters(self) -> Snapshot:
        return snapshot(self.nodes)


def parse_tcp_retrans(snmp: str) -> int:
    """``RetransSegs`` from the text of ``/proc/net/snmp`` (0 when absent)."""
    rows = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")]) if len(rows) == 2 and "RetransSegs" in rows[0] else 0


def snapshot(nodes: tuple[Node, ...]) -> Snapshot:
    """The counters of every node (works from any namespace, as root)."""
    import re
    texts = [_run(["cat", "/proc/net/dev"], n.netns) for n in nodes]
    retrans = tuple(parse_tcp_retrans(_run(["cat", "/proc/net/snmp"], n.netns)) for n in nodes)
    drops = tuple(sum(int(x) for x in re.findall(r"dropped (\d+)", _run(["tc", "-s", "qdisc", "show", "dev", n.veth],
                                                                        n.netns))) for n in nodes)
    return Snapshot.from_proc(texts, nodes, retrans, drops)


def nodes_to_env(nodes: tuple[Node, ...]) -> str:
    """A compact form of the nodes for child processes (``LEO_TOPO_NODES``)."""
    return ";".join(f"{n.netns},{n.veth},{n.cidr},{n.hostname}" for n in nodes)


def nodes_from_env(text: str) -> tuple[Node, ...]:
    nodes = []
    for i, item in enumerate(filter(None, text.split(";"))):
        ns, veth, cidr, hostname = item.split(",")
        iface = ipaddress.ip_interface(cidr)
        nodes.append(Node(i, ns, veth, str(iface.ip), iface.network.prefixlen, hostname))
    return tuple(nodes)
