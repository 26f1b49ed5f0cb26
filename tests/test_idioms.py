"""The idioms of a DDP + AdamW training script, with a sharded optimizer and the DDP hook, each a
parity test against the single-process oracle (gloo, W = 2): nanoGPT-style accumulation
(``ddp.require_backward_grad_sync = last_micro_step``) and ``no_sync()``, LR schedulers and
``param_group["lr"]`` set by hand, ``zero_grad(set_to_none=True/False)``, GradScaler, and the
rank-0 checkpoint (``state_dict()`` raises at once; ``consolidate_state_dict(to=0)`` works).
Loss scaling by 1/accum, as nanoGPT does, is part of every accumulating case."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params, params_hash, rel_err
from test_hooks import GradProbe

STEPS, WORLD = 6, 2
# (name, accumulation style, micro-steps, lr schedule, set_to_none, GradScaler)
CASES = [("nanogpt_accum", "flag", 3, "cosine", True, False),
         ("no_sync_accum", "no_sync", 2, "manual", False, False),
         ("zero_grad_keep", "none", 1, "step", False, False),
         ("amp_sched_accum", "flag", 2, "cosine", True, True)]


def _micro(step, rank, micro, shape):
    return local_grad(step * 5 + micro, rank, shape, True)


def _schedule(opt, kind):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return None


def _set_manual_lr(opt, base, step):  # nanoGPT's get_lr: written into every param group
    for group, lr in zip(opt.param_groups, base):
        group["lr"] = lr * (1.0 - step / (2 * STEPS))


def _train(rank, world, case):
    _, style, accum, sched_kind, set_to_none, use_amp = case
    net = GradProbe(make_params())
    ddp = DDP(net, bucket_cap_mb=0.0002)
    opt = leo_dist.ShardedLion(groups_for(list(net.ps), "lion"), bucket_mb=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_amp else None
    leo_dist.hooks.attach(ddp, opt, grad_scaler=scaler)
    sched = _schedule(opt, sched_kind)
    base = [g["lr"] for g in opt.param_groups]
    hashes = []
    for step in range(STEPS):
        if sched_kind == "manual":
            _set_manual_lr(opt, base, step)
        for micro in range(accum):
            last = micro == accum - 1
            if style == "flag":  # nanoGPT: set before the forward, which is where DDP reads it
                ddp.require_backward_grad_sync = last
            ctx = ddp.no_sync() if style == "no_sync" and not last else contextlib.nullcontext()
            with ctx:  # forward and backward inside no_sync(), as DDP requires
                loss = ddp([_micro(step, rank, micro, p.shape) for p in net.ps]) / accum
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
            opt.clip_grad_norm_(1.0)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched:
            sched.step()
        opt.zero_grad(set_to_none=set_to_none)
        hashes.append(params_hash(net.ps))
    return [p.detach().clone() for p in net.ps], hashes


def _oracle(case):
    _, _, accum, sched_kind, _, use_amp = case
    params = make_params()
    opt = leo_dist.Lion(groups_for(params, "lion"))
    sched = _schedule(opt, sched_kind)
    base = [g["lr"] for g in opt.param_groups]
    for step in range(STEPS):
        if sched_kind == "manual":
            _set_manual_lr(opt, base, step)
        for p in params:
            p.grad = sum(_micro(step, r, m, p.shape) for r in range(WORLD) for m in range(accum)) / accum / WORLD
        if use_amp:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if sched:
            sched.step()
    return params


def _all(rank, world):
    return {case[0]: _train(rank, world, case) for case in CASES}


def test_training_loop_idioms_match_the_oracle():
    out = run_ranks(_all, WORLD)
    for case in CASES:
        got, hashes = out[0][case[0]]
        assert hashes == out[1][case[0]][1], f"{case[0]}: replicas diverged"
        for i, (a, b) in enumerate(zip(got, _oracle(case))):
            assert rel_err(a, b.detach()) <= 2e-6, (case[0], i, rel_err(a, b.detach()))


def _rank0_checkpoint(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLion(groups_for(params, "lion"), bucket_mb=1e-4)
    for step in range(3):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True)
        opt.step()
    out = {}
    if rank == 0:  # the usual script: torch.save(opt.state_dict()) on rank 0 only
        try:
            opt.state_dict()
        except RuntimeError as e:
            out["error"] = str(e)
    opt.consolidate_state_dict(to=0)  # the fix: on every rank...
    if rank == 0:
        out["state"] = opt.state_dict()  # ...then state_dict() on rank 0
    return out


def test_rank0_state_dict_raises_at_once_and_consolidate_gives_the_oracle_state():
    out = run_ranks(_rank0_checkpoint, WORLD, timeout=120)
    assert "consolidate_state_dict(to=0)" in out[0]["error"] and "sharded_state_dict" in out[0]["error"]
    params = make_params()
    oracle = leo_dist.Lion(groups_for(params, "lion"))
    for step in range(3):
        for p in params:
            p.grad = sum(local_grad(step, r, p.shape, True) for r in range(WORLD)) / WORLD
        oracle.step()
    want = oracle.state_dict()["state"]
    got = out[0]["state"]["state"]
    for i in want:
        assert torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]), i
    fresh = leo_dist.Lion(groups_for(make_params(), "lion"))
    fresh.load_state_dict(out[0]["state"])  # the consolidated checkpoint loads into the single-process class
