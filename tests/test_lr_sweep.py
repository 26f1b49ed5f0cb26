"""benchmarks/lr_sweep.py's bookkeeping: keys, the lr of each factor, best-lr summary and report."""
from __future__ import annotations

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import lr_sweep  # noqa: E402


def test_keys_and_base_lrs():
    assert lr_sweep.sweep_key("leo exact", 1.0, 2, 0, "tiny", 1000, 16) == "leo exact|W2|seed0|tiny|1000"
    assert lr_sweep.sweep_key("leo exact", 0.333, 2, 1, "tiny", 1000, 4).endswith("|b4|lr*0.333")
    assert lr_sweep.base_lr("leo exact") == 1e-3
    assert lr_sweep.base_lr("lion grad_comm=1bit") == 3e-4
    assert lr_sweep.base_lr("adamw (DDP)") == 2e-3
    assert lr_sweep.base_lr("leo + DDP PowerSGD") == 1e-3


def _run(config, factor, seed, val):
    return dict(config=config, world=2, seed=seed, preset="tiny", steps=100, lr_factor=factor, val_loss=val)


def test_summary_picks_the_lowest_mean_on_shared_seeds_and_report_compares_best_with_best():
    runs = {str(i): r for i, r in enumerate([
        _run("leo exact", 0.333, 0, 2.5), _run("leo exact", 1.0, 0, 2.2), _run("leo exact", 1.0, 1, 2.4),
        _run("leo exact", 3.0, 0, 2.6),
        # seed 1 only at 0.333, where it is poor: the choice is made on seed 0, which 1.0 wins
        _run("lion exact", 0.333, 0, 2.0), _run("lion exact", 0.333, 1, 2.5), _run("lion exact", 1.0, 0, 2.1)])}
    rows = lr_sweep.summarise(runs, ["leo exact", "lion exact"], [0.333, 1.0, 3.0], 2)
    assert [r["best"] for r in rows] == [1.0, 0.333]
    assert rows[1]["chosen_on"] == [0] and rows[1]["cells"][0.333] == pytest.approx((2.25, 0.25, 2))
    assert rows[0]["cells"][1.0] == pytest.approx((2.3, 0.1, 2))
    assert rows[1]["lr"] == pytest.approx(3e-4 * 0.333)
    args = types.SimpleNamespace(preset="tiny", steps=100, batch_size=16, worlds=[2], out="/x/lr_sweep",
                                 reuse=os.path.join(lr_sweep.ROOT, "docs", "convergence", "convergence.json"))
    text = lr_sweep.report(runs, ["leo exact", "lion exact"], [0.333, 1.0, 3.0], args, "cmd")
    assert "**2.3000 ± 0.1000 (2)**" in text
    assert "| lion exact | **2.2500 ± 0.2500 (2)** | 2.1000 ± 0.0000 (1) | – | 9.99e-05 | 0 |" in text
    assert f"{100 * (2.25 / 2.3 - 1):+.2f}%" in text
