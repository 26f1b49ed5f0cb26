"""ShardedLion / ShardedLeo against the single-process oracle, on gloo, W = 1..4."""
from __future__ import annotations

import math

import pytest
import torch

import leo_dist
from conftest import run_ranks
from dist_util import (SHAPES, averaged_grad, groups_for, local_grad, make_params, oracle_run, params_hash,
                       rel_err)

STEPS = 20


def _train(rank, world, kind, steps, dyadic, bucket_mb, grad_comm, dtype=torch.float32):
    params = make_params(dtype=dtype)
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(groups_for(params, kind), bucket_mb=bucket_mb, grad_comm=grad_comm)
    hashes = []
    for step in range(steps):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, dyadic).to(dtype)
        opt.step()
        hashes.append(params_hash(params))
    momentum = opt.state_bytes()["exp_avg"] // 4
    layout = [(b.kind, b.numel, b.padded, b.shard) for b in opt.layout.buckets]
    return dict(params=[p.detach().clone() for p in params], hashes=hashes, momentum=momentum, layout=layout,
                stats=opt.comm_stats(), replicas=opt.verify_replicas())


CASES = [(kind, bucket_mb) for kind in ("lion", "leo") for bucket_mb in (1e-4, 25)]


def _train_cases(rank, world, steps, dyadic, grad_comm):
    return {case: _train(rank, world, case[0], steps, dyadic, case[1], grad_comm) for case in CASES}


# bucket_mb=1e-4 (~26 fp32 elements) makes many small buckets: boundaries everywhere, empty shards.
# Both rules and both bucket sizes run in one spawn of the ranks.
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parity_with_oracle(world):
    dyadic = True
    runs = run_ranks(_train_cases, world, STEPS, dyadic, "fp32")
    for kind, bucket_mb in CASES:
        out = [r[(kind, bucket_mb)] for r in runs]
        expected, _ = oracle_run(kind, world, STEPS, dyadic)
        # Replicas bitwise identical after every step.
        for r in range(1, world):
            assert out[r]["hashes"] == out[0]["hashes"], f"{kind} {bucket_mb}: rank {r} diverged"
        assert all(o["replicas"] for o in out)
        params = out[0]["params"]
        for i, (got, want) in enumerate(zip(params, expected)):
            matrix = kind == "leo" and i < len(SHAPES) // 2 and got.ndim == 2
            if matrix:
                assert rel_err(got, want) <= 2e-6, (kind, bucket_mb, i, rel_err(got, want))
            else:
                # sign paths with dyadic gradients: the same bytes as the oracle
                assert torch.equal(got, want), (kind, bucket_mb, i, rel_err(got, want))


def _train_kinds(rank, world, steps, dyadic, bucket_mb, grad_comm):
    return {kind: _train(rank, world, kind, steps, dyadic, bucket_mb, grad_comm) for kind in ("lion", "leo")}


@pytest.mark.parametrize("world", [2, 3])
def test_parity_random_gradients_bf16_wire(world):
    runs = run_ranks(_train_kinds, world, STEPS, False, 1e-4, "bf16")
    for kind in ("lion", "leo"):
        out = [r[kind] for r in runs]
        expected, _ = oracle_run(kind, world, STEPS, False, wire=torch.bfloat16)
        for r in range(1, world):
            assert out[r]["hashes"] == out[0]["hashes"], kind
        for got, want in zip(out[0]["params"], expected):
            assert rel_err(got, want) <= 2e-6, kind


def test_memory_and_bytes_accounting():
    world = 3
    out = run_ranks(_train, world, "lion", 2, True, 1e-4, "fp32")
    n = sum(math.prod(s) for s in SHAPES)
    layout = out[0]["layout"]
    assert sum(numel for _, numel, _, _ in layout) == n
    for o in out:
        # each rank holds its shard of every bucket: ⌈N/W⌉ plus per-bucket padding to 8 elements
        assert o["momentum"] == sum(shard for *_, shard in layout)
        assert o["momentum"] <= math.ceil(n / world) + 8 * len(layout)
    last = out[0]["stats"]["last_step"]
    padded = sum(p for _, _, p, _ in layout)
    assert last["reduce_scatter"]["bytes_in"] == 4 * padded
    assert last["reduce_scatter"]["bytes_out"] == 4 * padded
    assert last["reduce_scatter"]["calls"] == len(layout)
    # the update: S/8 bytes of bits per rank and bucket; dyadic random grads never give c == 0, so
    # no zero bitmaps travel; the zero flags: one float per bucket, in one all-reduce
    assert last["all_gather"]["bytes_in"] == sum(s // 8 for *_, s in layout)
    assert last["all_gather"]["bytes_out"] == world * sum(s // 8 for *_, s in layout)
    assert last["all_gather"]["bytes_in"] <= n / 8 / world + len(layout) + 1
    if world > 1:
        assert last["all_reduce"]["bytes_in"] == 4 * (1 + len(SHAPES)) + 4 * len(layout), last["all_reduce"]


def _zero_grad_param(rank, world):
    # The first parameter's gradient is exactly zero on every rank: c is exactly 0 there, so only
    # decay may move it. (A gradient that is None on every rank leaves it alone: test_reliability.py.)
    p0 = torch.ones(37, requires_grad=True)
    p1 = torch.ones(29, requires_grad=True)
    opt = leo_dist.ShardedLion([p0, p1], lr=0.1, weight_decay=0.5)
    for step in range(3):
        p0.grad = torch.zeros(37)
        p1.grad = local_grad(step, rank, p1.shape, True)
        opt.step()
    return p0.detach().clone(), opt.comm_stats()["last_step"].get("all_gather", {}).get("calls", 0)


@pytest.mark.parametrize("world", [1, 3])
def test_exact_zero_gets_no_sign_step(world):
    out = run_ranks(_zero_grad_param, world)
    p0, gathers = out[0]
    expected = torch.ones(37)
    for _ in range(3):
        expected.mul_(1 - 0.1 * 0.5)
    assert torch.equal(p0, expected)
    # the zero bitmap travelled (a second all-gather per step) because some c was exactly 0
    if world > 1:
        assert gathers == 2


def _save_both(rank, world, steps):
    return {kind: _save(rank, world, kind, steps) for kind in ("lion", "leo")}


def _resume_both(rank, world, saved, start, steps, first_world):
    return {kind: _resume(rank, world, kind, *saved[kind], start, steps, first_world) for kind in saved}


def _save(rank, world, kind, steps):
    params = make_params()
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(groups_for(params, kind), bucket_mb=1e-4)
    for step in range(steps):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True)
        opt.step()
    opt.consolidate_state_dict(to=0)
    return opt.state_dict() if rank == 0 else None, [p.detach().clone() for p in params]


def _resume(rank, world, kind, sd, start_params, start, steps, first_world):
    params = make_params()
    with torch.no_grad():
        for p, q in zip(params, start_params):
            p.copy_(q)
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(groups_for(params, kind), bucket_mb=1e-4)
    opt.load_state_dict(sd)
    for step in range(start, steps):
        for p in params:
            # the same averaged gradients as the uninterrupted run at first_world ranks
            p.grad = averaged_grad(step, first_world, p.shape, True)
        opt.step()
    return [p.detach().clone() for p in params]


def test_checkpoint_reshards():
    half, steps = 6, 12
    saved = run_ranks(_save_both, 4, half)[0]  # both rules in each spawn
    resumed = {world: run_ranks(_resume_both, world, saved, half, steps, 4)[0] for world in (2, 3)}
    for kind in ("lion", "leo"):
        _check_resharded(kind, saved[kind], {w: r[kind] for w, r in resumed.items()}, half, steps)


def _check_resharded(kind, saved, resumed, half, steps):
    expected, _ = oracle_run(kind, 4, steps, True)
    sd, mid = saved
    for exp_avg in (e["exp_avg"] for e in sd["state"].values()):
        assert exp_avg.dtype == torch.float32
    for world, got in resumed.items():
        for g, w in zip(got, expected):
            assert rel_err(g, w) <= 2e-6, (kind, world)
    # into the single-process optimizer
    params = [q.clone().requires_grad_() for q in mid]
    cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
    opt = cls(groups_for(params, kind))
    opt.load_state_dict(sd)
    for step in range(half, steps):
        for p in params:
            p.grad = averaged_grad(step, 4, p.shape, True)
        opt.step()
    for g, w in zip(params, expected):
        assert rel_err(g.detach(), w) <= 2e-6


def _clip(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4)
    norms = []
    for step in range(5):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, False)
        norms.append(float(opt.clip_grad_norm_(0.5)))
        opt.step()
    return norms, [p.detach().clone() for p in params]


def test_clip_grad_norm_matches_oracle():
    world = 3
    out = run_ranks(_clip, world)
    params = make_params()
    opt = leo_dist.Leo(groups_for(params, "leo"))
    for step in range(5):
        for p in params:
            p.grad = averaged_grad(step, world, p.shape, False)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        assert abs(float(norm) - out[0][0][step]) <= 1e-5 * float(norm)
        opt.step()
    for g, w in zip(out[0][1], params):
        assert rel_err(g, w.detach()) <= 2e-6


def _mismatch(rank, world):
    shapes = SHAPES if rank == 0 else SHAPES[:-1]
    try:
        leo_dist.ShardedLion(make_params(shapes))
    except ValueError as e:
        return str(e)
    return None


def test_ranks_disagreeing_on_params_raise_not_hang():
    out = run_ranks(_mismatch, 2, timeout=60)
    assert all(o is not None and "disagree" in o for o in out)


def test_bad_arguments():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="grad_comm"):
        leo_dist.ShardedLion(p, grad_comm="fp16")
    with pytest.raises(ValueError, match="update_comm"):
        leo_dist.ShardedLeo(p, update_comm="exactly")
    with pytest.raises(ValueError, match="bucket_mb"):
        leo_dist.ShardedLion(p, bucket_mb=0)
    with pytest.raises(ValueError, match="lr"):
        leo_dist.ShardedLion(p, lr=-1)
    with pytest.raises(TypeError, match="process_group"):
        leo_dist.ShardedLion(p, process_group="world")
    with pytest.raises(TypeError, match="params"):
        leo_dist.ShardedLion([torch.zeros(3, dtype=torch.int64)])
    if torch.device("meta") is not None:
        with pytest.raises(ValueError, match="one device"):
            leo_dist.ShardedLion([torch.zeros(3), torch.zeros(3, device="meta")])
    opt = leo_dist.ShardedLion(p)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_world_of_one_without_process_group_matches_oracle():
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"))
    assert opt.world_size == 1
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step, 0, p.shape, False)
        opt.step()
    expected, oracle = oracle_run("leo", 1, STEPS, False)
    for g, w in zip(params, expected):
        assert rel_err(g.detach(), w) <= 2e-6
    # momentum held in opt.state, as torch.optim code expects
    oracle_params = [q for g in oracle.param_groups for q in g["params"]]
    for p, q in zip(params, oracle_params):
        assert rel_err(opt.state[p]["exp_avg"].view_as(p), oracle.state[q]["exp_avg"]) <= 1e-6
    assert opt.comm_stats()["total"]["sum"]["calls"] == 0


def _mixed_dtypes(rank, world):
    params = make_params(SHAPES[:5]) + make_params(SHAPES[5:], dtype=torch.bfloat16)
    # the oracle rounds bf16 to nearest; so does this run (stochastic rounding: test_reliability.py)
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4, bf16_rounding="nearest")
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True).to(p.dtype)
        opt.step()
    kinds = {(b.kind, b.dtype) for b in opt.layout.buckets}
    return [p.detach().clone() for p in params], params_hash(params), sorted(map(str, kinds))


def test_mixed_dtypes_get_separate_buckets_and_match_oracle():
    world = 2
    out = run_ranks(_mixed_dtypes, world)
    assert out[0][1] == out[1][1]
    assert any("bfloat16" in k for k in out[0][2]) and any("float32" in k for k in out[0][2])
    params = make_params(SHAPES[:5]) + make_params(SHAPES[5:], dtype=torch.bfloat16)
    opt = leo_dist.Leo(groups_for(params, "leo"))
    for step in range(STEPS):
        for p in params:
            p.grad = averaged_grad(step, world, p.shape, True).to(p.dtype)
        opt.step()
    for got, want in zip(out[0][0], params):
        if got.dtype == torch.bfloat16:
            # Leo's bf16 matrices: the update travels in bf16 (update_comm="exact" sends the parameter
            # dtype), one rounding more than the oracle: allow one bf16 ulp per step, as for bf16 Leo.
            assert rel_err(got, want.detach()) <= STEPS * 2.0**-8
        else:
            assert rel_err(got, want.detach()) <= 2e-6


def _native_reduce_scatter(rank, world):
    import os
    os.environ["LEO_DIST_REDUCE_SCATTER"] = "native"  # NCCL's branch: reduce_scatter_tensor (gloo has it)
    out = {}
    for kind in ("lion", "leo"):
        for wire in ("fp32", "bf16"):
            run = _train(rank, world, kind, STEPS, False, 1e-4, wire)
            out[(kind, wire)] = run["params"], run["hashes"], run["stats"]["last_step"]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_nccl_branch_forced_on_gloo_matches_oracle(world):
    runs = run_ranks(_native_reduce_scatter, world)  # both rules and both wire dtypes in one spawn
    for (kind, wire), first in runs[0].items():
        for r in range(1, world):
            assert runs[r][(kind, wire)][1] == first[1], (kind, wire)
        # fp32: reduce_scatter_tensor; bf16: still an all-to-all with a float32 sum (one rounding, at
        # the sender), so the bf16 branch is the same on NCCL and gloo
        rs = first[2]["reduce_scatter"]
        assert rs["bytes_out"] * (world if wire == "fp32" else 1) == rs["bytes_in"], (kind, wire, rs)  # the branch
        expected, _ = oracle_run(kind, world, STEPS, False, wire=torch.bfloat16 if wire == "bf16" else torch.float32)
        for got, want in zip(first[0], expected):
            assert rel_err(got, want) <= 2e-6, (kind, wire)
