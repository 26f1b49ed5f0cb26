"""CPU-side parts of benchmarks/memory.py: sizes, units, ratios, merging, tables, the peak meter."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory as M  # noqa: E402


def test_parse_count_and_model_shape():
    assert M.parse_count("50M") == 50_000_000 and M.parse_count("1.5k") == 1500 and M.parse_count("7") == 7
    with pytest.raises(ValueError):
        M.parse_count("lots")
    assert M.model_shape(50_000_000) == (2041, 12)
    assert M.model_shape(200_000_000) == (4082, 12)
    assert M.model_shape(400_000_000) == (4096, 24)
    w, layers = M.model_shape(1_000_000)
    assert abs(layers * (w * w + w) - 1_000_000) / 1e6 < 0.1


def test_status_kib():
    text = "Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   1000 kB\n"
    assert M.status_kib("VmHWM", text) == 123456 and M.status_kib("VmRSS", text) == 1000
    with pytest.raises(KeyError):
        M.status_kib("VmSwap", text)


def test_state_bytes_counts_storages_once():
    import leo_dist

    ps = [torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(10, 10))]
    opt = leo_dist.ShardedLion(ps)  # world of 1: one bucket, per-parameter views of one buffer
    sb = M.state_bytes(opt)
    assert sb["exp_avg"] >= 200 * 4 and sb["exp_avg"] < 2 * 200 * 4
    lion = leo_dist.Lion(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    lion.step()
    assert M.state_bytes(lion) == {"exp_avg": 800}


def _result(config, peak, world=2, params=50_356_224):
    return M.Result(config=config, world=world, params=params, device="cpu", peak_above_baseline=[peak, peak - 1],
                    baseline=[0, 0], momentum_bytes=[4 * params // world] * 2, state_bytes=[{"exp_avg": 1}] * 2,
                    method="m", steps=3)


def test_units_ratios_targets_and_merge():
    n = 50_356_224
    ref, lion = _result("ddp_lion", 8 * n), _result("sharded_lion_fp32", 4 * n)
    assert ref.peak_units == pytest.approx(2.0) and lion.momentum_units == pytest.approx(0.5)
    rat = M.ratios([ref, lion, _result("hook_leo_exact", 4 * n, world=4)])
    assert rat[lion.key()] == pytest.approx(0.5) and rat[("cpu", 4, n, "hook_leo_exact")] is None
    assert M.target_for(lion) == 0.55 and M.target_for(_result("sharded_lion_fp32", 1, world=4)) is None
    merged = M.merge([ref, lion], [_result("sharded_lion_fp32", 2 * n)])
    assert [r.config for r in merged] == ["ddp_lion", "sharded_lion_fp32"]
    assert merged[1].peak_above_baseline[0] == 2 * n
    md = M.table(merged)
    assert "| 0.250 |" in md and "≤0.55 ✓" in md


def test_save_load_roundtrip(tmp_path):
    rs = [_result("ddp_lion", 100), _result("hook_lion_fp32", 60)]
    path = str(tmp_path / "m.json")
    M.save(path, rs, {"command": "x"})
    back = M.load(path)
    assert [r.key() for r in back] == [r.key() for r in rs]
    assert back[1].peak_above_baseline == [60, 59]


def test_peak_meter_sees_an_allocation():
    meter = M.PeakMeter(torch.device("cpu"))
    base = meter.current()
    meter.reset()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert meter.peak() - base > 48 * 2**20


def test_attribute_allocations_groups_by_call_site():
    class Ev:
        def __init__(self, name, mem=0, parent=None):
            self.name, self.self_cpu_memory_usage, self.cpu_parent = name, mem, parent
            self.self_device_memory_usage = 0

    step = Ev("/x/leo_dist/sharded.py(199): step")
    stage = Ev("/x/leo_dist/exchange.py(41): _stage", parent=step)
    cat = Ev("aten::cat", parent=stage)
    evs = [step, stage, cat, Ev("aten::empty", 1000, cat), Ev("aten::empty", 24, cat), Ev("aten::add", -5, stage)]
    rows = M.attribute_allocations(evs)
    assert rows == [{"op": "aten::cat", "calls": 2, "bytes": 1024,
                     "stack": ["leo_dist/exchange.py:41 _stage", "leo_dist/sharded.py:199 step"]}]


def test_thin_keeps_peaks():
    samples = [(i, i % 7) for i in range(10_000)] + [(10_000, 99)]
    out = M.thin(samples, 100)
    assert len(out) == 100 and max(b for _, b in out) == 99
    assert M.thin(samples[:5], 100) == samples[:5]
