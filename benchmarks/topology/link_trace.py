"""Where a testbed step's time goes: the link's bytes against time, and the exchange's events.

Diagnosis, not a measurement to quote (the sampler costs rank 0 some CPU). With
``LEO_TOPO_TRACE=DIR`` in the environment of ``benchmarks/topology/run.py``, every rank of every
configuration:

- rank 0 samples, every ~5 ms on a thread of its own, its namespace's ``/proc/self/net/dev``:
  the veth's tx (node 0 → node 1) and rx (node 1 → node 0) bytes, and ``lo``'s tx (inside node
  0); rates are read over 20 ms bins, since the veth counts whole TSO segments (up to 64 KiB,
  5 ms of a 100 Mbit/s link); the machine's CPU jiffies, all and idle (``/proc/stat``); and rank
  0's minor page faults (first touches of freshly allocated memory, about 3 µs per 4 KiB here);
- records, with ``time.perf_counter`` (CLOCK_MONOTONIC, comparable across the ranks of the
  machine), the start and end of the gradient exchange's calls (``GradientExchange._launch``,
  ``_send``, ``_node_stage``, ``_take``, ``_finish_oldest``) and of the two-level update gather
  (``HierComm.all_gather_start``, its ``wait``), with the thread they ran on;
- writes ``DIR/<config>.rank<r>.json`` at exit; the worker's window records (``step_marks``)
  give each timed step's forward / backward / step() boundaries.

``python benchmarks/topology/link_trace.py DIR/<config>.rank0.json RAW.json`` prints, per timed step,
the phases, the link's busy time per direction and its idle time inside each phase.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import sys
import threading
import time

import testbed


class Tracer:
    def __init__(self, out: str, veth: str, sample: bool):
        self.out, self.veth, self.sample = out, veth, sample
        self.samples: list[tuple[float, int, int, int, int, int, int]] = []
        self.events: list[tuple[str, str, float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="leo-topo-trace")

    def _read(self) -> tuple[int, int, int, int, int, int]:
        with open("/proc/stat") as f:  # machine-wide: jiffies of all CPUs, and the idle ones
            cpu = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/net/dev") as f:
            dev = testbed.parse_proc_net_dev(f.read())
        veth, lo = dev[self.veth], dev["lo"]
        return (veth["tx_bytes"], veth["rx_bytes"], lo["tx_bytes"], sum(cpu), cpu[3] + cpu[4],
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), *self._read()))
            time.sleep(0.005)

    def wrap(self, owner, name: str, label=None) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tag = label(*args, **kwargs) if label else ""
                self.events.append((name, tag, t0, time.perf_counter(), threading.current_thread().name))
        setattr(owner, name, traced)

    def start(self) -> None:
        from leo_dist import exchange, topology
        bucket = lambda self_, bi=None, *a, **k: str(bi)  # noqa: E731
        for name in ("_launch", "_send", "_node_stage"):
            self.wrap(exchange.GradientExchange, name, bucket)
        for name in ("_take", "_finish_oldest"):
            self.wrap(exchange.GradientExchange, name)
        self.wrap(topology.HierComm, "all_gather_start")
        self.wrap(topology._Staged, "wait")
        if self.sample:
            self._thread.start()
        atexit.register(self.dump)

    def dump(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        with open(self.out, "w") as f:
            json.dump(dict(samples=self.samples, events=self.events), f)


def install(config: str, veth: str) -> None:
    """Called by the topology worker on every rank when ``LEO_TOPO_TRACE`` is set."""
    d = os.environ["LEO_TOPO_TRACE"]
    os.makedirs(d, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    Tracer(os.path.join(d, f"{config}.rank{rank}.json"), veth, sample=rank == 0).start()


def _between(samples, a: float, b: float) -> list:
    """The samples taken in [a, b)."""
    return [s for s in samples if a <= s[0] < b]


def _rates(samples, a: float, b: float, col: int, width: float = 0.02) -> list[float]:
    """Bytes/s of counter ``col`` in consecutive ``width`` bins of [a, b) (from the first and last
    sample of each bin)."""
    out = []
    for j in range(max(1, round((b - a) / width))):
        inside = _between(samples, a + j * width, a + (j + 1) * width)
        out.append((inside[-1][col + 1] - inside[0][col + 1]) / (inside[-1][0] - inside[0][0])
                   if len(inside) > 1 and inside[-1][0] > inside[0][0] else 0.0)
    return out


def report(trace_path: str, raw_path: str, rate: float = 100e6 / 8, width: float = 0.02) -> str:
    """Per timed step of rank 0: phases, seconds the veth carried ≥ 20% of ``rate`` (tx, rx),
    seconds neither direction did, per phase; the sender thread's seconds in each traced call."""
    tr = json.load(open(trace_path))
    raw = json.load(open(raw_path))
    events = tr["events"]
    calls = ("_node_stage", "_take", "_finish_oldest", "all_gather_start", "wait")
    lines = ["| step | total | fwd | bwd | step() | tx busy | rx busy | idle in fwd | in bwd | in step() | "
             + " | ".join(f"sender {c}" for c in calls) + " | main wait | CPU busy fwd / bwd / step() | rank 0 page faults, MiB |",
             "|---|" + "---|" * (12 + len(calls))]
    for w in raw["windows"]:
        for i, (t0, t1, t2, t3) in enumerate(w.get("step_marks", [])):
            samples = _between(tr["samples"], t0, t3 + width)  # this step's, scanned once

            def busy(a, b, cols=(0, 1)):
                per = [_rates(samples, a, b, c, width) for c in cols]
                return width * sum(max(x) >= 0.2 * rate for x in zip(*per))
            def spent(name, main=False):
                return sum(min(e1, t3) - max(e0, t0) for n, _, e0, e1, th in events
                           if n == name and (th == "MainThread") == main and e1 > t0 and e0 < t3)
            idle = [(b - a) - busy(a, b) for a, b in ((t0, t1), (t1, t2), (t2, t3))]

            def faults(a, b):
                inside = _between(samples, a, b)
                if len(inside) < 2 or len(inside[0]) < 7:  # traces from before the column
                    return float("nan")
                return (inside[-1][6] - inside[0][6]) * 4096 / 2**20

            def cpu(a, b):  # share of the machine's CPU time that was not idle (jiffies: 10 ms)
                inside = _between(samples, a, b)
                if len(inside) < 2 or inside[-1][4] == inside[0][4]:
                    return float("nan")
                return 1 - (inside[-1][5] - inside[0][5]) / (inside[-1][4] - inside[0][4])
            lines.append(f"| {w['first_step'] + i} | {t3 - t0:.3f} | {t1 - t0:.3f} | {t2 - t1:.3f} | {t3 - t2:.3f} | "
                         f"{busy(t0, t3, (0,)):.3f} | {busy(t0, t3, (1,)):.3f} | "
                         + " | ".join(f"{x:.3f}" for x in idle) + " | "
                         + " | ".join(f"{spent(c):.3f}" for c in calls) + f" | {spent('wait', True):.3f} | "
                         + " / ".join(f"{cpu(a, b):.0%}" for a, b in ((t0, t1), (t1, t2), (t2, t3))) + f" | {faults(t0, t3):.1f} |")
    return "\n".join(lines) + "\n"


def timeline(trace_path: str, raw_path: str, step_index: int = 2, width: float = 0.05) -> str:
    """One timed step, ``width`` bins: link MB/s both ways and lo, with the phase each bin is in."""
    tr, raw = json.load(open(trace_path)), json.load(open(raw_path))
    t0, t1, t2, t3 = raw["windows"][0]["step_marks"][step_index]
    rows = []
    cols = [_rates(tr["samples"], t0, t3, c, width) for c in range(3)]
    for j, (tx, rx, lo) in enumerate(zip(*cols)):
        at = t0 + j * width
        phase = "fwd" if at < t1 else "bwd" if at < t2 else "step"
        rows.append(f"{at - t0:6.2f} {phase:4} tx {tx / 1e6:6.2f} rx {rx / 1e6:6.2f} lo {lo / 1e6:7.1f} MB/s")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(report(sys.argv[1], sys.argv[2]))
    if len(sys.argv) > 3:
        print(timeline(sys.argv[1], sys.argv[2], int(sys.argv[3])))
