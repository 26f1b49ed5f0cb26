"""The testbed's diagnosis tools (benchmarks/topology/link_trace.py, cpu_cost.py): their pure parts."""
from __future__ import annotations

import json
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "topology"))

import cpu_cost  # noqa: E402
import link_trace  # noqa: E402

RATE = 12.5e6  # bytes/s: 100 Mbit/s


def _samples(busy_until: float, end: float, dt: float = 0.005):
    """A link that carries RATE both ways until ``busy_until`` and nothing after; the CPU busy
    on half its jiffies; 4 KiB of page faults per sample."""
    out, tx, t, jiffies, idle, faults = [], 0, 0.0, 0, 0, 0
    while t <= end + 1e-9:
        out.append((t, tx, tx, 0, jiffies, idle, faults))
        if t < busy_until:
            tx += int(RATE * dt)
        t, jiffies, idle, faults = t + dt, jiffies + 2, idle + 1, faults + 1
    return out


def test_rates_are_read_per_bin():
    s = _samples(busy_until=0.5, end=1.0)
    rates = link_trace._rates(s, 0.0, 1.0, 0, width=0.1)
    assert len(rates) == 10
    assert all(r == pytest.approx(RATE, rel=0.01) for r in rates[:5])
    assert all(r == 0 for r in rates[5:])


def test_report_splits_busy_and_idle_time_by_phase(tmp_path):
    # one step: forward [0, 0.3), backward [0.3, 0.6), step() [0.6, 1.0); the link busy until 0.5
    trace = dict(samples=_samples(busy_until=0.5, end=1.0),
                 events=[["_node_stage", "0", 0.35, 0.45, "leo_dist-sender-rank0"],
                         ["wait", "", 0.1, 0.2, "MainThread"]])
    raw = dict(windows=[dict(first_step=12, step_marks=[[0.0, 0.3, 0.6, 1.0]])])
    (tmp_path / "t.json").write_text(json.dumps(trace))
    (tmp_path / "r.json").write_text(json.dumps(raw))
    table = link_trace.report(str(tmp_path / "t.json"), str(tmp_path / "r.json"))
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row[0] == "12" and float(row[1]) == pytest.approx(1.0)
    assert float(row[5]) == pytest.approx(0.5, abs=0.03)  # tx busy
    idle_fwd, idle_bwd, idle_step = map(float, row[7:10])
    assert idle_fwd == pytest.approx(0.0, abs=0.03)
    assert idle_bwd == pytest.approx(0.1, abs=0.03)
    assert idle_step == pytest.approx(0.4, abs=0.03)
    assert float(row[10]) == pytest.approx(0.1)  # the sender's _node_stage
    assert float(row[15]) == pytest.approx(0.1)  # the main thread's wait
    assert row[16] == "50% / 50% / 50%"
    assert float(row[17]) == pytest.approx(200 * 4096 / 2**20, abs=0.05)  # MiB of page faults


def test_thread_cpu_names_this_threads():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="probe-thread")
    t.start()
    try:
        names = {name for _, name in cpu_cost._thread_cpu()}
    finally:
        stop.set()
        t.join()
    assert "probe-thread" in names and len(names) >= 2
    assert all(v >= 0 for v in cpu_cost._thread_cpu().values())
