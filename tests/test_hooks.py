"""DDP + leo_dist hook against standalone ShardedLeo and the single-process oracle (gloo, W = 2, 3)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params, params_hash, rel_err

STEPS = 20


class GradProbe(nn.Module):
    """loss = Σ p·G: backward leaves exactly G in p.grad, so the tests choose every gradient."""

    def __init__(self, params):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params])

    def forward(self, grads):
        return sum((p * g).sum() for p, g in zip(self.ps, grads))


def _micro_grad(step, rank, micro, shape):
    # micro-batch 0 of each step is the usual local gradient; later ones are distinct dyadic values
    return local_grad(step * 7 + micro, rank, shape, True)


def _ddp_train(rank, world, kind, accum, clip, bucket_cap_mb):
    net = GradProbe(make_params())
    ddp = DDP(net, bucket_cap_mb=bucket_cap_mb)
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(groups_for(list(ddp.module.ps), kind), bucket_mb=1e-4)
    leo_dist.hooks.attach(ddp, opt)
    hashes, norms = [], []
    for step in range(STEPS):
        for micro in range(accum):
            grads = [_micro_grad(step, rank, micro, p.shape) for p in net.ps]
            if micro < accum - 1:
                with ddp.no_sync():
                    ddp(grads).backward()
            else:
                ddp(grads).backward()
        if clip:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
        hashes.append(params_hash(net.ps))
    return [p.detach().clone() for p in net.ps], hashes, norms


def _oracle(kind, world, accum, clip):
    params = make_params()
    cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
    opt = cls(groups_for(params, kind))
    norms = []
    for step in range(STEPS):
        for p in params:
            total = None
            for r in range(world):
                g = sum(_micro_grad(step, r, m, p.shape) for m in range(accum))
                total = g if total is None else total + g
            p.grad = total / world
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        opt.step()
    return params, norms


HOOK_CASES = [("leo", 1, None), ("lion", 3, None), ("leo", 2, 0.7)]  # (kind, accumulation, clip)


def _ddp_cases(rank, world, bucket_cap_mb):
    return {case: _ddp_train(rank, world, *case, bucket_cap_mb) for case in HOOK_CASES}


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_hook_matches_oracle(world):
    runs = run_ranks(_ddp_cases, world, 0.0002)  # every case in one spawn, a DDP model each
    for kind, accum, clip in HOOK_CASES:
        out = [r[(kind, accum, clip)] for r in runs]
        for r in range(1, world):
            assert out[r][1] == out[0][1], (kind, accum, clip, "replicas diverged")
        expected, norms = _oracle(kind, world, accum, clip)
        for i, (got, want) in enumerate(zip(out[0][0], expected)):
            assert rel_err(got, want.detach()) <= 2e-6, (kind, accum, clip, i, rel_err(got, want.detach()))
        for a, b in zip(out[0][2], norms):
            assert abs(a - b) <= 1e-5 * b


def _standalone(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), bucket_mb=1e-4)
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step * 7, rank, p.shape, True)
        opt.step()
    return [p.detach().clone() for p in params]


def _hooked_and_standalone(rank, world):
    return _ddp_train(rank, world, "leo", 1, None, 25)[0], _standalone(rank, world)


def test_ddp_hook_equals_standalone_bitwise():
    hooked, alone = run_ranks(_hooked_and_standalone, 2)[0]
    for a, b in zip(hooked, alone):
        assert torch.equal(a, b)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, idx):
        return self.norm(self.lin(self.emb(idx))).square().mean()


def _mixed(rank, world, use_ddp):
    net = Mixed()
    groups = leo_dist.leo_param_groups(net)
    matrices, rest = groups[0]["params"], groups[1]["params"]
    model = DDP(net) if use_ddp else net
    leo = leo_dist.ShardedLeo(matrices, lr=1e-2)
    adam = torch.optim.AdamW(rest, lr=1e-2)
    if use_ddp:
        leo_dist.hooks.attach(model, leo)
    idx = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(rank))
    for _ in range(5):
        model(idx).backward()
        if not use_ddp:
            leo_dist.average_gradients(rest)
        leo.step()
        adam.step()
        leo.zero_grad()
        adam.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def test_mixed_leo_and_adamw_average_each_gradient_once():
    world = 2
    with_ddp = run_ranks(_mixed, world, True)
    standalone = run_ranks(_mixed, world, False)
    # the oracle: one process that sees the average of both ranks' losses
    net = Mixed()
    groups = leo_dist.leo_param_groups(net)
    leo = leo_dist.Leo(groups[0]["params"], lr=1e-2)
    adam = torch.optim.AdamW(groups[1]["params"], lr=1e-2)
    idxs = [torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    for _ in range(5):
        (sum(net(i) for i in idxs) / world).backward()
        leo.step()
        adam.step()
        leo.zero_grad()
        adam.zero_grad()
    for got in (with_ddp, standalone):
        assert all(torch.equal(a, b) for a, b in zip(got[0], got[1]))
        for a, b in zip(got[0], net.parameters()):
            assert rel_err(a, b.detach()) <= 1e-5


def _misuse(rank, world):
    errors = {}
    net = GradProbe(make_params())
    ddp = DDP(net)
    other = leo_dist.ShardedLion([nn.Parameter(torch.zeros(3))])
    try:
        leo_dist.hooks.attach(ddp, other)
    except ValueError as e:
        errors["foreign_params"] = str(e)
    try:
        leo_dist.hooks.attach(ddp, leo_dist.Lion(ddp.parameters()))
    except TypeError as e:
        errors["not_sharded"] = str(e)
    opt = leo_dist.ShardedLion(ddp.parameters())
    ddp([torch.ones(p.shape) for p in net.ps]).backward()
    try:
        opt.step()
    except RuntimeError as e:
        errors["default_hook"] = str(e)
    return errors


def test_misuse_gets_clear_errors():
    out = run_ranks(_misuse, 2)
    for errors in out:
        assert "does not train" in errors["foreign_params"]
        assert "ShardedLeo or ShardedLion" in errors["not_sharded"]
        assert "attach" in errors["default_hook"]


def _amp_train(rank, world, use_ddp, bad_step, init_scales):
    net = GradProbe(make_params())
    model = DDP(net, bucket_cap_mb=0.0002) if use_ddp else net
    opt = leo_dist.ShardedLeo(groups_for(list(net.ps), "leo"), bucket_mb=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scales[rank])
    if use_ddp:
        leo_dist.hooks.attach(model, opt, grad_scaler=scaler)
    warnings.simplefilter("error", FutureWarning)  # this child process only
    scales = []
    for step in range(8):
        grads = [local_grad(step * 7, rank, p.shape, True) for p in net.ps]
        if step == bad_step and rank == world - 1:
            grads[0] = grads[0].clone()
            grads[0].view(-1)[0] = float("inf")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(grads)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        opt.clip_grad_norm_(10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in net.ps], scales


@pytest.mark.parametrize("use_ddp,init_scales", [(True, (2.0**10, 2.0**10)), (False, (2.0**10, 2.0**10)),
                                                 (True, (2.0**10, 2.0**4)), (False, (2.0**3, 2.0**12))])
def test_grad_scaler_unscale_clip_and_skip_agree_across_ranks(use_ddp, init_scales):
    # GradScaler's current protocol (no grad_scaler= keyword, so no FutureWarning): each rank
    # unscales its own gradients by its own scale before averaging, so the result is the oracle's
    # even when the ranks' scales differ; the overflow on the last rank skips the step everywhere.
    world, bad_step = 2, 3
    out = run_ranks(_amp_train, world, use_ddp, bad_step, init_scales)
    for rank in range(world):
        scales = out[rank][1]
        assert scales[bad_step - 1] == init_scales[rank]
        want = init_scales[rank] / 2 if rank == world - 1 else init_scales[rank]
        assert scales[bad_step] == want, "only the rank that overflowed backs off its own scale"
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)
    # oracle: the same averaged gradients, clipped, with the bad step skipped
    params = make_params()
    opt = leo_dist.Leo(groups_for(params, "leo"))
    for step in range(8):
        if step == bad_step:
            continue
        for p in params:
            p.grad = sum(local_grad(step * 7, r, p.shape, True) for r in range(world)) / world
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    for got, want in zip(out[0][0], params):
        assert rel_err(got, want.detach()) <= 2e-6
