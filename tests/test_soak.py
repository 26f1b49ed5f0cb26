"""Soak: many steps at W=3 of every sharded mode at once, with tiny buckets (every boundary case,
ranks that own nothing but padding): replicas stay bitwise equal (checked every 10 steps), the
momentum per rank stays at 4·N/W bytes plus padding, and exact sharded Lion ends bitwise on the
single-process oracle.

The default suite runs ``SOAK_STEPS`` = 100 steps; ``LEO_DIST_SOAK_STEPS=1000`` runs the long
soak (a few minutes on two busy cores, see the report it prints with ``-s``).
"""
from __future__ import annotations

import os
import time

import torch

import leo_dist
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params, oracle_run

SOAK_STEPS = int(os.environ.get("LEO_DIST_SOAK_STEPS", "100"))
WORLD, CHECK_EVERY, BUCKET_MB = 3, 10, 1e-4
# (name, kind, grad_comm, update_comm, dyadic gradients): the first is exact, compared to the oracle
MODES = [("lion-fp32", "lion", "fp32", "exact", True), ("lion-bf16", "lion", "bf16", "exact", False),
         ("lion-1bit", "lion", "1bit", "exact", False), ("leo-exact", "leo", "fp32", "exact", False),
         ("leo-1bit", "leo", "bf16", "1bit", False)]


def _build(kind, grad_comm, update_comm, seed):
    params = make_params(seed=seed)
    if kind == "lion":
        return params, leo_dist.ShardedLion(groups_for(params, kind), bucket_mb=BUCKET_MB, grad_comm=grad_comm,
                                            grad_comm_warmup=5)
    return params, leo_dist.ShardedLeo(groups_for(params, kind), bucket_mb=BUCKET_MB, grad_comm=grad_comm,
                                       update_comm=update_comm, grad_comm_warmup=5)


def _soak(rank, world, steps):
    runs = {name: (_build(kind, gc, uc, seed=i), dyadic) for i, (name, kind, gc, uc, dyadic) in enumerate(MODES)}
    t0 = time.monotonic()
    diverged, checks = [], 0
    for step in range(steps):
        for name, ((params, opt), dyadic) in runs.items():
            for p in params:
                p.grad = local_grad(step, rank, p.shape, dyadic)
            opt.step()
        if (step + 1) % CHECK_EVERY == 0:
            checks += 1
            diverged += [(step, name) for name, ((_, opt), _) in runs.items() if not opt.verify_replicas()]
    elapsed = time.monotonic() - t0
    memory, empty, finite = {}, {}, {}
    for name, ((params, opt), _) in runs.items():
        n = sum(p.numel() for p in params)
        buckets = opt.layout.buckets
        memory[name] = (opt.state_bytes(), n, len(buckets), sum(b.shard for b in buckets))
        empty[name] = sum(b.valid_in_shard(rank) == 0 for b in buckets)
        finite[name] = all(bool(torch.isfinite(p).all()) for p in params)
    exact = [p.detach().clone() for p in runs["lion-fp32"][0][0]]
    return dict(diverged=diverged, checks=checks, elapsed=elapsed, memory=memory, empty=empty, finite=finite,
                exact=exact)


def test_soak_all_modes_tiny_buckets_w3():
    t0 = time.monotonic()
    outs = run_ranks(_soak, WORLD, SOAK_STEPS, timeout=120 + 1.5 * SOAK_STEPS)
    wall = time.monotonic() - t0
    assert all(o["checks"] == SOAK_STEPS // CHECK_EVERY for o in outs)
    assert not any(o["diverged"] for o in outs), [o["diverged"] for o in outs]
    for name, *_ in MODES:
        assert all(o["finite"][name] for o in outs), name
        # some rank owns nothing but padding in some bucket: the empty-shard case is exercised
        assert sum(o["empty"][name] for o in outs) > 0, name
        for rank, o in enumerate(outs):
            state, n, n_buckets, shard_elems = o["memory"][name]
            # momentum: fp32, this rank's shard of every bucket; padding < 8 elements per bucket and rank
            assert state["exp_avg"] == 4 * shard_elems, (name, rank, state)
            assert state["exp_avg"] <= 4 * n / WORLD + 4 * 8 * n_buckets, (name, rank, state, n, n_buckets)
            assert state["update_error"] <= 4 * n / WORLD + 4 * 8 * n_buckets, (name, rank, state)
            if name == "leo-1bit":
                assert state["update_error"] > 0, state
    for r in range(1, WORLD):
        assert all(torch.equal(a, b) for a, b in zip(outs[r]["exact"], outs[0]["exact"]))
    expected, _ = oracle_run("lion", WORLD, SOAK_STEPS, True)
    assert all(torch.equal(a, b) for a, b in zip(outs[0]["exact"], expected)), "exact Lion left the oracle"
    print(f"\nsoak: {SOAK_STEPS} steps x {len(MODES)} optimizers at W={WORLD}: "
          f"{max(o['elapsed'] for o in outs):.1f} s stepping, {wall:.1f} s in all; "
          f"buckets per optimizer {[outs[0]['memory'][m[0]][2] for m in MODES]}, "
          f"padding-only shards (all ranks) {[sum(o['empty'][m[0]] for o in outs) for m in MODES]}")
