"""CPU-side parts of benchmarks/gpu_check.py: tolerances, parity comparison, report, no-CUDA exit."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check as G  # noqa: E402


def test_compare_bitwise_and_tolerances():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert G.compare(a, a.clone(), G.SIGN)[0]
    b = a.clone()
    b[1] = torch.nextafter(b[1], torch.tensor(0.0))
    assert not G.compare(b, a, G.SIGN)[0]
    assert G.compare(b, a, G.KERNEL_MATRIX)[0]  # one ulp is within rtol=1e-6
    assert not G.compare(a * (1 + 1e-5), a, G.KERNEL_MATRIX)[0]
    assert G.compare(a * (1 + 1e-6), a, G.SHARDED_MATRIX)[0]
    assert not G.compare(a * (1 + 1e-5), a, G.SHARDED_MATRIX)[0]
    assert not G.compare(a[:2], a, G.KERNEL_MATRIX)[0]  # shape mismatch
    nan = a.clone()
    nan[0] = float("nan")
    assert not G.compare(nan, nan.clone(), G.KERNEL_MATRIX)[0]


def test_tolerances_for_kinds():
    ts = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 3, 4)]
    assert G.tolerances_for("lion", ts, G.KERNEL_MATRIX) == [G.SIGN] * 3
    assert G.tolerances_for("leo", ts, G.KERNEL_MATRIX) == [G.KERNEL_MATRIX, G.SIGN, G.SIGN]


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_kernel_parity_on_cpu_tensors(kind):
    recs = G.kernel_parity(kind, torch.device("cpu"), False, False, steps=3)
    assert [r.ok for r in recs] == [True, True]
    assert all(r.section == "kernels" for r in recs)


def test_compare_all_reports_the_failing_tensor():
    ref = [torch.ones(4, 4), torch.ones(3)]
    got = [torch.ones(4, 4), torch.ones(3) * 2]
    rec = G.compare_all("kernels", "x", got, ref, G.tolerances_for("leo", ref, G.KERNEL_MATRIX))
    assert rec.ok is False and "#1 (3,)" in rec.detail and rec.value == pytest.approx(1.0)
    assert G.compare_all("kernels", "x", got[:1], ref, [G.SIGN]).ok is False


@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_sharded_parity_world_one_on_cpu(kind):
    rec, same = G.sharded_parity(kind, torch.device("cpu"), 0, 1, steps=3)
    assert rec.ok, rec.detail
    assert same


def test_write_report(tmp_path):
    recs = [G.Record("kernels", "a | b", True, 0.0, "max rel diff", "fine"),
            G.Record("bandwidth", "copy", None, 123.4, "GB/s"),
            G.Record("sync_debug", "step", False, detail="phase opt.step synchronises")]
    jpath, mpath = G.write_report(recs, str(tmp_path / "out"), {"command": "c", "device": "d"})
    data = json.load(open(jpath))
    assert data["summary"] == {"passed": 1, "failed": 1, "measured": 1}
    assert data["records"][2]["detail"] == "phase opt.step synchronises"
    md = open(mpath).read()
    assert "## bandwidth" in md and "**FAIL**" in md and "123.4 GB/s" in md and "a \\| b" in md


def test_guarded_records_exceptions():
    recs = []

    def boom():
        raise ValueError("nope")

    G.guarded("nccl", recs, boom)
    G.guarded("kernels", recs, lambda: [G.Record("kernels", "ok", True)])
    assert [r.ok for r in recs] == [False, True]
    assert "ValueError: nope" in recs[0].detail and "traceback" in recs[0].data


def test_main_without_cuda_exits_cleanly(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.main(["--out", str(tmp_path / "x")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
