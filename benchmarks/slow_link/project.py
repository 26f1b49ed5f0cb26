#!/usr/bin/env python
"""Latency–bandwidth model of each scheme: fitted to the slow-link measurements, checked against
them, then used to project step communication time to large jobs.

Model of one step's communication for scheme ``c`` with W ranks and N parameters::

    t_comm = κ_c · bytes_c(N, W) / B  +  calls_c(N) · ⌈log2 W⌉ · α

``bytes_c`` is the cost model of configs.py (bytes each rank sends per step under the ideal ring /
direct algorithms of SPEC §2), ``calls_c`` the number of collective calls (one per bucket and
collective kind), ``B`` the link rate, ``α`` the latency of one message hop, ``κ_c`` how much longer
than line rate the scheme's bytes actually take (1 = perfect; it absorbs headers, TCP dynamics,
gloo's algorithms and whatever does not overlap).

On the benchmark's link every rank shares one shaped loopback, so there ``B`` is the aggregate and
``bytes`` is the total over ranks (W · bytes_c); the measured step time is modelled as the
unshaped step time of the same run plus ``t_comm``. ``κ_c`` is the least-squares fit over the
scheme's measured points; the check reports every point's error, with κ fitted on all points and
with κ fitted on the lowest rate only (the other rates then being a prediction).

Projection assumptions (stated in docs/benchmarks.md too): every rank has its own full-duplex link
of rate B into a non-blocking network (so per-rank bytes set the time), fp32 parameters, 25 MB
buckets, tree-depth latency ⌈log2 W⌉·α per collective call with α = 10 µs, no overlap with
compute (the numbers are the communication a step must hide or wait for), κ_c = 1 (the ideal
algorithm; the measured κ are printed beside it), GPT-style models (12·d² per layer, untied
32k-token embeddings and head, 2048 positions).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import configs

__all__ = ["fit", "project", "synthetic_shapes", "PROJECTION_MODELS", "PROJECTION_WORLDS", "PROJECTION_LINKS",
           "ALPHA_S"]

ALPHA_S = 10e-6
PROJECTION_WORLDS = (8, 32, 128, 512, 1024)
PROJECTION_LINKS = (100e9, 400e9)
# (label, n_layer, d_model): GPT-style shapes that land near the named sizes.
PROJECTION_MODELS = (("1B", 18, 2048), ("7B", 32, 4096), ("13B", 40, 5120), ("70B", 86, 8192))


def synthetic_shapes(n_layer: int, d: int, vocab: int = 32000, positions: int = 2048) -> configs.Shapes:
    shapes, matrix = [(vocab, d), (positions, d)], [False, False]
    for _ in range(n_layer):
        for s, m in (((d,), False), ((d,), False), ((3 * d, d), True), ((3 * d,), False), ((d, d), True),
                     ((d,), False), ((d,), False), ((d,), False), ((4 * d, d), True), ((4 * d,), False),
                     ((d, 4 * d), True), ((d,), False)):
            shapes.append(s)
            matrix.append(m)
    shapes += [(d,), (d,), (vocab, d)]
    matrix += [False, False, True]
    return configs.Shapes(tuple(shapes), tuple(matrix))


@dataclass
class Point:
    config: str
    world: int
    rate_bps: float
    step_s: float          # median step time on the shaped link
    free_step_s: float     # median step time of the same run on the unshaped loopback
    model_bytes_per_rank: float

    @property
    def x(self) -> float:
        """Seconds the cost model's bytes take at line rate on the shared link."""
        return self.world * self.model_bytes_per_rank * 8 / self.rate_bps

    @property
    def y(self) -> float:
        return self.step_s - self.free_step_s


def _kappa(points: list[Point]) -> float:
    sxx = sum(p.x * p.x for p in points)
    return sum(p.x * p.y for p in points) / sxx if sxx > 0 else float("nan")


def fit(points: list[Point]) -> tuple[dict[str, float], list[dict]]:
    """κ per scheme, and one row per measured point with the model's predictions and errors."""
    by_cfg: dict[str, list[Point]] = {}
    for p in points:
        by_cfg.setdefault(p.config, []).append(p)
    kappas, rows = {}, []
    for name, pts in by_cfg.items():
        k_all = _kappa(pts)
        low = min(p.rate_bps for p in pts)
        k_low = _kappa([p for p in pts if p.rate_bps == low])
        kappas[name] = k_all
        for p in pts:
            pred = {tag: p.free_step_s + k * p.x for tag, k in (("ideal", 1.0), ("fit", k_all), ("holdout", k_low))}
            rows.append(dict(config=name, world=p.world, rate_bps=p.rate_bps, measured_s=p.step_s,
                             free_step_s=p.free_step_s, line_rate_comm_s=p.x, kappa=k_all, kappa_low_rate=k_low,
                             holdout=p.rate_bps != low,
                             **{f"pred_{t}_s": v for t, v in pred.items()},
                             **{f"err_{t}": v / p.step_s - 1 for t, v in pred.items()}))
    return kappas, rows


def comm_time(cfg: configs.Config, shapes: configs.Shapes, world: int, link_bps: float, kappa: float = 1.0,
              alpha: float = ALPHA_S) -> float:
    phases = cfg.cost(shapes, world)
    bw = sum(p.bytes_per_rank for p in phases) * 8 / link_bps
    lat = sum(p.calls for p in phases) * math.ceil(math.log2(world)) * alpha
    return kappa * bw + lat


def project(names: list[str], kappas: dict[str, float] | None = None) -> list[dict]:
    """One row per (model, link, W): each scheme's step communication time in seconds (κ = 1)."""
    rows = []
    for label, n_layer, d in PROJECTION_MODELS:
        shapes = synthetic_shapes(n_layer, d)
        for link in PROJECTION_LINKS:
            for world in PROJECTION_WORLDS:
                row = dict(model=label, params=shapes.numel, link_gbit=link / 1e9, world=world)
                for name in names:
                    row[name] = comm_time(configs.REGISTRY[name], shapes, world, link)
                rows.append(row)
    return rows


def summarize_errors(rows: list[dict], key: str) -> float:
    errs = [abs(r[key]) for r in rows if key != "err_holdout" or r["holdout"]]
    return statistics.median(errs) if errs else float("nan")
