"""The slow link: a private network namespace whose loopback is shaped with ``tc``.

Every rank of a job runs inside one namespace and talks over its ``lo`` (127.0.0.1), so the only
traffic on that interface is the job's own, and its counters in ``/proc/net/dev`` (which are per
namespace) are the bytes the job put on the "wire". Rate limiting uses a token bucket (``tbf``),
optionally behind ``netem`` for a fixed one-way delay per packet.

Loopback counting: a packet sent over ``lo`` is transmitted and received by the same interface,
so ``tx_bytes == rx_bytes`` and each byte is counted once in each. We use ``tx_bytes``: it is the
sum over ranks of the bytes each rank sent (headers included), the quantity a per-node link
carries and the cost model predicts. ``tbf`` shapes egress, i.e. exactly that tx stream.

One shared link: ``lo`` is one interface, so ``rate`` caps the *aggregate* of all ranks' traffic,
like W hosts behind one shared uplink. With a dedicated link of the same rate per host, every
scheme's transfer time would shrink by about W alike; ratios between schemes do not change.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["Namespace", "parse_rate", "format_rate", "shape", "unshape", "read_counters", "require_root",
           "LinkCounters"]

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float:
    """'100mbit', '1gbit', '250Mbit' or a bare number of bit/s -> bit/s (float)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(bit|bps)?(/s)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot parse rate {text!r}; write e.g. 100mbit or 1gbit")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if m.group(3) == "bps":
        raise ValueError(f"rate {text!r}: use bits (mbit, gbit), not bytes")
    if value <= 0:
        raise ValueError(f"rate must be positive, got {text!r}")
    return value


def format_rate(bits_per_s: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits_per_s >= scale and abs(bits_per_s / scale - round(bits_per_s / scale)) < 1e-9:
            return f"{int(round(bits_per_s / scale))}{unit}"
    return f"{int(bits_per_s)}bit"


def require_root() -> None:
    """Exit with a clear message unless we can create namespaces and shape links."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/slow_link needs root: it creates a network namespace (ip netns) and "
                         "rate-limits its loopback (tc). Run it as root, e.g. `sudo -E .venv/bin/python "
                         "benchmarks/slow_link/run.py ...`.")
    if missing:
        raise SystemExit(f"benchmarks/slow_link needs the iproute2 tools {missing} (apt-get install iproute2)")


def _run(cmd: list[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", netns] if netns else []) + cmd
    res = subprocess.run(full, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(full)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def shape(rate_bps: float, delay_ms: float = 0.0, netns: str | None = None, dev: str = "lo") -> None:
    """Limit ``dev``'s egress to ``rate_bps`` (and delay each packet by ``delay_ms``).

    Run from inside the namespace (``netns=None``) or name it. Replaces any previous shaping.
    The bucket holds 2 ms of traffic (at least 256 KiB: a loopback packet is up to 64 KiB) and the
    queue 100 ms: deep enough that several ranks' TCP flows rarely overflow it (drops would be
    retransmitted and counted twice; the worker records retransmissions so that shows).
    """
    unshape(netns, dev)
    burst = max(256 * 1024, int(rate_bps / 8 * 0.002))
    tbf = ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "100ms"]
    if delay_ms > 0:
        _run(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms",
              "limit", "100000"], netns)
        _run(["tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:"] + tbf, netns)
    else:
        _run(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:"] + tbf, netns)


def unshape(netns: str | None = None, dev: str = "lo") -> None:
    """Remove any shaping from ``dev`` (no error when there is none)."""
    _run(["tc", "qdisc", "del", "dev", dev, "root"], netns, check=False)


@dataclass
class LinkCounters:
    tx_bytes: int
    tx_packets: int
    tcp_retrans: int
    qdisc_drops: int

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(self.tx_bytes - other.tx_bytes, self.tx_packets - other.tx_packets,
                            self.tcp_retrans - other.tcp_retrans, self.qdisc_drops - other.qdisc_drops)


def read_counters(dev: str = "lo") -> LinkCounters:
    """This process's namespace: ``dev``'s tx counters, TCP retransmissions and qdisc drops."""
    tx_bytes = tx_packets = None
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith(dev + ":"):
                fields = line.split(":", 1)[1].split()
                # receive: bytes packets errs drop fifo frame compressed multicast; then transmit
                tx_bytes, tx_packets = int(fields[8]), int(fields[9])
    if tx_bytes is None:
        raise RuntimeError(f"no interface {dev!r} in /proc/net/dev")
    retrans = 0
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    if len(rows) == 2:
        retrans = int(rows[1][rows[0].index("RetransSegs")])
    drops = 0
    if shutil.which("tc"):
        out = _run(["tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout
        drops = sum(int(x) for x in re.findall(r"dropped (\d+)", out))
    return LinkCounters(tx_bytes, tx_packets, retrans, drops)


class Namespace:
    """``with Namespace() as ns:`` a fresh namespace with ``lo`` up, deleted on exit (even on error)."""

    def __init__(self, name: str | None = None):
        self.name = name or f"leo_slow_{os.getpid()}"
        self._created = False

    def __enter__(self) -> "Namespace":
        require_root()
        if self.name in _run(["ip", "netns", "list"]).stdout.split():
            raise RuntimeError(f"network namespace {self.name!r} already exists; remove it "
                               f"(`ip netns del {self.name}`) or pick another name")
        _run(["ip", "netns", "add", self.name])
        self._created = True
        _run(["ip", "link", "set", "lo", "up"], self.name)
        return self

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        if self._created:
            _run(["ip", "netns", "del", self.name], check=False)
            self._created = False

    def __exit__(self, *exc) -> None:
        self.close()
