"""The slow-link benchmark's pure-Python parts: registry, cost models, projection fit, parsing.

The benchmark itself needs root and minutes (benchmarks/slow_link/run.py); none of that runs here.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "slow_link"))

import configs  # noqa: E402
import netns  # noqa: E402
import project  # noqa: E402
import report  # noqa: E402


def test_registry_names_and_lookup():
    names = configs.default_names()
    for required in ("ddp_adamw", "ddp_lion_fp16", "zero_lion", "ddp_powersgd_lion", "leo_lion_fp32",
                     "leo_lion_bf16", "leo_lion_fp32_ddp", "leo_lion_bf16_ddp"):
        assert required in names
    assert [c.name for c in configs.get("ddp_adamw,leo_lion_bf16")] == ["ddp_adamw", "leo_lion_bf16"]
    with pytest.raises(KeyError, match="unknown configuration"):
        configs.get(["nope"])
    with pytest.raises(ValueError, match="twice"):
        configs.register(configs.REGISTRY["ddp_adamw"])
    for cfg in configs.REGISTRY.values():
        assert cfg.family in configs.HYPER
        assert cfg.twin is None or cfg.twin in configs.REGISTRY


def test_cost_model_matches_spec_table_at_large_world():
    # One big matrix: no bucket headers or 1-D tensors to blur the per-element ratios of docs/design.md.
    shapes = configs.Shapes(((8192, 8192),), (True,))
    w = 1024
    ddp = configs.REGISTRY["ddp_adamw"].model_bytes(shapes, w)
    n = shapes.numel
    assert ddp == pytest.approx(8 * n, rel=2e-3)
    ratio = lambda name: configs.REGISTRY[name].model_bytes(shapes, w) / ddp  # noqa: E731
    assert ratio("ddp_lion_fp16") == pytest.approx(0.5, rel=1e-6)
    assert ratio("zero_lion") == pytest.approx(1.5, rel=1e-6)
    assert ratio("leo_lion_fp32") == pytest.approx(4.125 / 8, rel=2e-3)
    assert ratio("leo_lion_bf16") == pytest.approx(2.125 / 8, rel=2e-3)
    assert ratio("leo_lion_fp32_ddp") == ratio("leo_lion_fp32")
    # Leo's matrices with exact updates send 4 bytes where Lion sends 1/8.
    assert ratio("leo_leo_bf16") == pytest.approx(6 / 8, rel=2e-3)
    assert ratio("ddp_powersgd_lion") < 0.01


def test_powersgd_leaves_vectors_uncompressed():
    # (8+8)·4 factors·2 (min compression rate) = 128 > 64 elements: not worth compressing
    shapes = configs.Shapes(((1000,), (8, 8)), (False, True))
    plain, factors = configs._powersgd_split(shapes, rank=4)
    assert (plain, factors) == (1000 + 64, 0)
    shapes = configs.Shapes(((1000,), (512, 512)), (False, True))
    plain, factors = configs._powersgd_split(shapes, rank=4)
    assert (plain, factors) == (1000, 1024 * 4)


def test_rates_parse_and_format():
    assert netns.parse_rate("100mbit") == 100e6
    assert netns.parse_rate("1Gbit") == 1e9
    assert netns.format_rate(1e9) == "1gbit" and netns.format_rate(100e6) == "100mbit"
    for bad in ("fast", "100MBps", "0mbit"):
        with pytest.raises(ValueError):
            netns.parse_rate(bad)


def test_steps_to_target_interpolates():
    evals = [(0, 5.0), (10, 3.0), (20, 2.0)]
    assert report.steps_to_target(evals, 2.5) == pytest.approx(15.0)
    assert report.steps_to_target(evals, 3.0) == pytest.approx(10.0)
    assert report.steps_to_target(evals, 1.0) is None


def test_fit_recovers_kappa_and_checks_holdout():
    pts = []
    for world in (2, 4):
        for rate in (100e6, 1e9):
            b = 1e7 * world
            x = world * b * 8 / rate
            pts.append(project.Point("s", world, rate, 0.5 + 1.3 * x, 0.5, b))
    kappas, rows = project.fit(pts)
    assert kappas["s"] == pytest.approx(1.3)
    assert all(abs(r["err_fit"]) < 1e-9 and abs(r["err_holdout"]) < 1e-9 for r in rows)
    assert sum(r["holdout"] for r in rows) == 2


def test_projection_shapes_and_monotonicity():
    sizes = {label: project.synthetic_shapes(n, d).numel for label, n, d in project.PROJECTION_MODELS}
    for label, target in (("1B", 1e9), ("7B", 7e9), ("13B", 13e9), ("70B", 70e9)):
        assert 0.85 * target < sizes[label] < 1.1 * target
    rows = project.project(["ddp_adamw", "leo_lion_bf16"])
    assert len(rows) == len(project.PROJECTION_MODELS) * len(project.PROJECTION_LINKS) * len(project.PROJECTION_WORLDS)
    for r in rows:
        assert r["leo_lion_bf16"] < r["ddp_adamw"]
    r7 = [r for r in rows if r["model"] == "7B" and r["link_gbit"] == 100]
    # Bandwidth terms of ring algorithms flatten with W; only the latency term grows (log W).
    assert r7[-1]["ddp_adamw"] / r7[0]["ddp_adamw"] < 1.5
    big = project.synthetic_shapes(32, 4096)
    t = project.comm_time(configs.REGISTRY["ddp_adamw"], big, 1024, 100e9, alpha=0.0)
    assert t == pytest.approx(2 * 1023 / 1024 * 4 * big.numel * 8 / 100e9)
    assert math.isfinite(t)
