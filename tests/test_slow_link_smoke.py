"""The slow-link benchmark's pure-Python parts: registry, cost models, projection fit, parsing;
and one unshaped worker run (its windows, warm-up windows included).

The benchmark itself needs root and minutes (benchmarks/slow_link/run.py); none of that runs here.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

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


def test_time_to_target_counts_the_uncompressed_steps_at_their_own_speed():
    assert report.time_to_target(None, 1.0, 10, 3.0) is None
    assert report.time_to_target(30.0, 1.0) == pytest.approx(30.0)
    assert report.time_to_target(30.0, 1.0, 10, None) == pytest.approx(30.0)  # warm-up not timed
    assert report.time_to_target(30.0, 1.0, 10, 3.0) == pytest.approx(10 * 3.0 + 20 * 1.0)
    assert report.time_to_target(6.5, 1.0, 10, 3.0) == pytest.approx(6.5 * 3.0)  # reached within the warm-up
    rec = dict(windows=[dict(rate_bps=1e8, phase="warmup"), dict(rate_bps=1e8, phase="main"), dict(rate_bps=1e9)])
    assert [w.get("phase") for w in report.steady_windows(rec)] == ["main", None]


def test_uncompressed_steps_per_configuration():
    reg = configs.REGISTRY
    assert configs.uncompressed_steps(reg["ddp_powersgd_lion"], object()) == configs.POWERSGD_START_ITER
    assert configs.uncompressed_steps(reg["ddp_adamw"], object()) == 0
    one_bit = types.SimpleNamespace(grad_comm="1bit", grad_comm_warmup=7)
    assert configs.uncompressed_steps(reg["leo_lion_1bit"], one_bit) == 7
    assert configs.uncompressed_steps(reg["leo_lion_bf16"], types.SimpleNamespace(grad_comm="bf16",
                                                                                   grad_comm_warmup=7)) == 0


def test_worker_times_warmup_windows_within_the_warmup(tmp_path):
    """worker.py, W=2, unshaped: a 1-bit configuration (10 exact steps in the suite) gets warm-up
    windows that end by step 10, then the steady windows at --window-at; all steps train once."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rec.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(root, "benchmarks", "slow_link", "worker.py"), "--config", "leo_lion_1bit",
           "--preset", "tiny", "--batch-size", "2", "--steps", "15", "--eval-every", "5", "--eval-batches", "2",
           "--window-at", "12", "--windows", "100mbit:2,1gbit:2", "--warmup-window-at", "2",
           "--warmup-timed-steps", "5", "--no-shape", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["uncompressed_steps"] == configs.SUITE_1BIT_WARMUP == 10
    got = [(w["phase"], w["rate_bps"], w["first_step"], w["steps"], len(w["step_s"])) for w in rec["windows"]]
    # at most 5 per rate, shortened to end by step 10: (10 - 2 + 1) // 2 = 4 per rate
    assert got == [("warmup", 1e8, 2, 4, 4), ("warmup", 1e9, 6, 4, 4), ("main", 1e8, 12, 2, 2),
                   ("main", 1e9, 14, 2, 2)]
    assert len(rec["train_loss"]) == 15 and rec["replicas_identical"]
    # windows skip evaluations: step 5 is in one, 10 is not, 15 (the last) is evaluated after its window
    assert [s for s, _ in rec["evals"]] == [0, 10, 15]
    assert len(rec["free_step_s"]) == 3  # steps 1, 10 and 11


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


def test_bf16_warmup_configurations_build_what_they_name():
    import torch
    for name in ("leo_lion_1bit_bf16warm", "leo_leo_1bit_1bit_bf16warm"):
        cfg = configs.REGISTRY[name]
        _, opt = cfg.build(torch.nn.Linear(8, 4), 1, configs.HYPER[cfg.family])
        assert (opt.grad_comm, opt.warmup_grad_comm) == ("1bit", "bf16")
        assert configs.uncompressed_steps(cfg, opt) == configs.SUITE_1BIT_WARMUP
        twin = configs.REGISTRY[f"{name}_ddp_overlap_b2"]
        assert twin.twin == name and twin.update == cfg.update
