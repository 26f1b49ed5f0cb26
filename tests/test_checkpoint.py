"""Checkpoints: sharded through torch.distributed.checkpoint at one world size, resumed at another;
consolidation onto one rank; the rank-0-only state_dict() pattern fails at once instead of hanging."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import leo_dist
from conftest import run_ranks
from dist_util import averaged_grad, groups_for, local_grad, make_params, oracle_run, params_hash, rel_err

# (kind, grad_comm, update_comm[, warmup_grad_comm]): every mode of the sharded optimizers; the
# bf16 warm-up one is saved inside its warm-up (6 steps), so the resumed runs finish it
MODES = [("lion", "fp32", "exact"), ("lion", "bf16", "exact"), ("lion", "1bit", "exact"),
         ("leo", "fp32", "exact"), ("leo", "bf16", "1bit"), ("leo", "1bit", "1bit"), ("leo", "1bit", "1bit", "bf16")]
HALF, STEPS = 4, 8


def _opt(params, kind, grad_comm, update_comm, warmup_grad_comm=None):
    warmup = dict(grad_comm_warmup=2) if warmup_grad_comm is None else dict(
        grad_comm_warmup=HALF + 2, warmup_grad_comm=warmup_grad_comm)
    if kind == "lion":
        return leo_dist.ShardedLion(groups_for(params, kind), bucket_mb=1e-4, grad_comm=grad_comm, **warmup)
    return leo_dist.ShardedLeo(groups_for(params, kind), bucket_mb=1e-4, grad_comm=grad_comm,
                               update_comm=update_comm, **warmup)


def _grads(params, step, world, rank, resumed_from):
    for p in params:
        # a resumed run sees the averaged gradients of the first run: the same data, fewer ranks
        p.grad = (averaged_grad(step, resumed_from, p.shape, True) if resumed_from
                  else local_grad(step, rank, p.shape, True))


def _save_dcp(rank, world, mode, path):
    params = make_params()
    opt = _opt(params, *mode)
    for step in range(HALF):
        _grads(params, step, world, rank, None)
        opt.step()
    sd = opt.sharded_state_dict()
    dcp.save({"optim": sd}, checkpoint_id=path)
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    mid = [p.detach().clone() for p in params]
    for step in range(HALF, STEPS):
        _grads(params, step, world, rank, None)
        opt.step()
    return full, mid, [p.detach().clone() for p in params]


def _resume_dcp(rank, world, mode, path, mid, first_world):
    params = make_params()
    with torch.no_grad():
        for p, q in zip(params, mid):
            p.copy_(q)
    opt = _opt(params, *mode)
    sd = {"optim": opt.sharded_state_dict()}
    dcp.load(sd, checkpoint_id=path)
    opt.load_sharded_state_dict(sd["optim"])
    opt.consolidate_state_dict(to=0)
    loaded = opt.state_dict() if rank == 0 else None
    steps = loaded["leo_dist"]["steps"] if rank == 0 else None
    hashes = []
    for step in range(HALF, STEPS):
        _grads(params, step, world, rank, first_world)
        opt.step()
        hashes.append(params_hash(params))
    return loaded, [p.detach().clone() for p in params], hashes, steps


def _save_dcp_all(rank, world, root):
    # every mode in one set of processes (spawning ranks costs more than the runs themselves)
    return [_save_dcp(rank, world, mode, f"{root}/{'-'.join(mode)}") for mode in MODES]


def _resume_dcp_all(rank, world, root, mids, first_world):
    return [_resume_dcp(rank, world, mode, f"{root}/{'-'.join(mode)}", mid, first_world)
            for mode, mid in zip(MODES, mids)]


def test_dcp_save_at_4_resume_at_1_to_4(tmp_path):
    root = str(tmp_path)
    saved = run_ranks(_save_dcp_all, 4, root)[0]
    resumed = {world: run_ranks(_resume_dcp_all, world, root, [s[1] for s in saved], 4) for world in (1, 2, 3, 4)}
    for m, mode in enumerate(MODES):
        _check_resumed(mode, saved[m][0], {w: [o[m] for o in outs] for w, outs in resumed.items()})


def _check_resumed(mode, saved_full, resumed):
    exact = mode[1] != "1bit" and mode[2] == "exact"
    for world, outs in resumed.items():
        loaded, params, hashes, steps = outs[0]
        assert steps == HALF  # the step count (1-bit warm-up) came back from the checkpoint
        for r in range(1, world):
            assert outs[r][2] == hashes, f"replicas diverged at W={world}"
        # what was saved is what was loaded: momentum and update errors bitwise, the 1-bit gradient
        # error as the mean over the saving ranks (the documented rule)
        for i, entry in saved_full["state"].items():
            for key, value in entry.items():
                if key == "grad_error":  # re-averaged over the new ranks: x·3/3 may round
                    assert rel_err(loaded["state"][i][key], value) <= 1e-6, (world, i, key)
                else:
                    assert torch.equal(loaded["state"][i][key], value), (world, i, key)
        if exact and mode[1] == "fp32":
            expected, _ = oracle_run(mode[0], 4, STEPS, True)
            for got, want in zip(params, expected):
                if mode[0] == "lion":
                    assert torch.equal(got, want)
                else:
                    assert rel_err(got, want) <= 2e-6


def _rank0_only_state_dict(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLion(params, bucket_mb=1e-4)
    for p in params:
        p.grad = local_grad(0, rank, p.shape, True)
    opt.step()
    error, elapsed = None, None
    if rank == 0:
        t0 = time.monotonic()
        try:
            opt.state_dict()
        except RuntimeError as e:
            error = str(e)
        elapsed = time.monotonic() - t0
    # everyone is still in step: the next collective works
    replicas = opt.verify_replicas()
    return error, elapsed, replicas


def test_state_dict_on_rank_0_only_raises_at_once():
    out = run_ranks(_rank0_only_state_dict, 2)
    error, elapsed, replicas = out[0]
    assert error is not None and "sharded_state_dict" in error and "consolidate_state_dict" in error
    assert elapsed < 1.0
    assert replicas and out[1][2]


def _consolidated_after_step_is_dropped(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4)
    for p in params:
        p.grad = local_grad(0, rank, p.shape, True)
    opt.step()
    opt.consolidate_state_dict(to=1)
    got = opt.state_dict() if rank == 1 else None
    for p in params:
        p.grad = local_grad(1, rank, p.shape, True)
    opt.step()
    try:
        opt.state_dict()
        stale = True
    except RuntimeError:
        stale = False
    return got, stale


def test_consolidate_to_another_rank_and_not_after_a_step():
    out = run_ranks(_consolidated_after_step_is_dropped, 3)
    assert out[0][0] is None and out[1][0] is not None
    assert not any(o[1] for o in out), "a consolidated state outlived the next step"
    assert set(out[1][0]["state"]) == set(range(len(make_params())))


def test_world_of_one_state_dict_loads_into_single_process():
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4)
    for p in params:
        p.grad = local_grad(0, 0, p.shape, True)
    opt.step()
    sd = opt.state_dict()
    assert sd["leo_dist"]["format"] == leo_dist.checkpoint.FORMAT
    single = leo_dist.Leo(groups_for([p.detach().clone().requires_grad_() for p in params], "leo"))
    single.load_state_dict(sd)
    with pytest.raises(ValueError, match="ShardedLeo"):
        leo_dist.ShardedLion(params).load_state_dict(sd)
