"""``ShardedLeo(update_comm="bf16")``: Leo's matrix updates travel rounded to bfloat16.

The oracle is the functional ``leo_update(..., update_dtype=torch.bfloat16)`` fed the averaged
gradients: the same rounding of the same update, applied by every rank. Checked at W = 1, 3, 4
(tiny buckets: matrices split across ranks, rows split, empty shards) against the oracle, against
the exact mode (the rounding must show), for the bytes it saves, and across a checkpoint resharded
from 2 ranks to 3.
"""
from __future__ import annotations

import pytest
import torch

import leo_dist
from conftest import run_ranks
from dist_util import SHAPES, averaged_grad, groups_for, local_grad, make_params, params_hash, rel_err
from leo_dist.functional import leo_update

STEPS = 12
DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01, align_const=0.2, eps=1e-8, orthogonalize=True)


def oracle(worlds: list[int], update_dtype):
    """Single-process Leo through the functional rule; ``worlds[step]``: the world size whose
    averaged gradient step ``step`` takes (a checkpoint resharded mid-run)."""
    params = make_params()
    groups = [dict(DEFAULTS, **g) for g in groups_for(params, "leo")]
    exp_avgs = {id(p): torch.zeros_like(p) for p in params}
    with torch.no_grad():
        for step, world in enumerate(worlds):
            for g in groups:
                ps = g["params"]
                grads = [averaged_grad(step, world, p.shape, True) for p in ps]
                leo_update(ps, grads, [exp_avgs[id(p)] for p in ps], lr=g["lr"], beta1=g["betas"][0],
                           beta2=g["betas"][1], weight_decay=g["weight_decay"], align_const=g["align_const"],
                           eps=g["eps"], orthogonalize=g["orthogonalize"], update_dtype=update_dtype)
    return [p.detach().clone() for p in params]


def _train(rank, world, update_comm, steps, start=0, state=None, bucket_mb=1e-4):
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=bucket_mb, update_comm=update_comm)
    if state is not None:
        sd, values = state
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        opt.load_state_dict(sd)
    hashes = []
    for step in range(start, start + steps):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True)
        opt.step()
        hashes.append(params_hash(params))
    stats = opt.comm_stats()["last_step"].get("all_gather", {})
    mat_shards = sum(b.shard for b in opt.layout.buckets if b.kind == "matrix")
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict() if rank == 0 else None
    return dict(params=[p.detach().clone() for p in params], hashes=hashes, replicas=opt.verify_replicas(),
                gathered=stats.get("sent", 0), mat_shards=mat_shards, state=sd)


def _both(rank, world):
    return {mode: _train(rank, world, mode, STEPS) for mode in ("exact", "bf16")}


@pytest.mark.parametrize("world", [1, 3, 4])
def test_bf16_updates_match_the_oracle_and_halve_the_matrix_bytes(world):
    runs = run_ranks(_both, world)
    want = oracle([world] * STEPS, torch.bfloat16)
    exact = oracle([world] * STEPS, None)
    for mode in ("exact", "bf16"):
        assert all(r[mode]["replicas"] for r in runs)
        assert all(r[mode]["hashes"] == runs[0][mode]["hashes"] for r in runs), f"{mode}: replicas diverged"
    got = runs[0]["bf16"]["params"]
    n_half = len(SHAPES) // 2
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        if i < n_half and g.ndim == 2:  # Leo's 2-D rule: norms summed across shards, in another order
            assert rel_err(g, w) <= 3e-5, (i, rel_err(g, w))
            # the rounding is real: the exact trajectory is further from this oracle
            assert rel_err(e, w) > max(3 * rel_err(g, w), 0.0), (i, rel_err(e, w), rel_err(g, w))
        else:  # sign rule, dyadic gradients: bitwise
            assert torch.equal(g, w), (i, rel_err(g, w))
    if world > 1:  # each matrix update element crosses (W-1) times at 2 bytes instead of 4
        saved = runs[0]["exact"]["gathered"] - runs[0]["bf16"]["gathered"]
        assert saved == (world - 1) * runs[0]["bf16"]["mat_shards"] * 2 > 0


def _resume(rank, world, state, start, steps):
    return _train(rank, world, "bf16", steps, start=start, state=state)


def test_bf16_updates_resume_from_a_checkpoint_at_another_world_size():
    first = run_ranks(_train, 2, "bf16", 5)
    state = (first[0]["state"], first[0]["params"])
    second = run_ranks(_resume, 3, state, 5, 4)
    want = oracle([2] * 5 + [3] * 4, torch.bfloat16)
    assert all(r["replicas"] for r in second)
    for i, (g, w) in enumerate(zip(second[0]["params"], want)):
        assert rel_err(g, w) <= 3e-5, (i, rel_err(g, w))


def test_bad_update_comm_is_named():
    with pytest.raises(ValueError, match="update_comm must be 'exact', 'bf16' or '1bit'"):
        leo_dist.ShardedLeo([torch.nn.Parameter(torch.ones(2, 2))], update_comm="fp16")
