"""torch's current protocols: the compiled-autograd form of DDP comm hooks, picklable hook state
(as PowerSGDState), a 1-D DeviceMesh wherever a process group goes, GradScaler's current
protocol (no deprecated keyword, no private scaler field, no process-wide warnings filter)."""
from __future__ import annotations

import inspect
import os
import pickle
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params, params_hash, rel_err
from test_hooks import GradProbe

STEPS = 4


def _python_reducer(rank, world):
    # torch._dynamo.config.optimize_ddp = "python_reducer" is how DDP runs under compiled autograd:
    # per-parameter post-accumulate-grad hooks call the comm hook with (param.grad, param) and ignore
    # its result. Those hooks also run eagerly, which exercises the same form without compiling.
    import torch._dynamo

    torch._dynamo.config.optimize_ddp = "python_reducer"
    net = GradProbe(make_params())
    ddp = DDP(net, bucket_cap_mb=0.0002)
    assert ddp._use_python_reducer
    held, foreign = list(net.ps)[:6], list(net.ps)[6:]  # the rest: "trained by another optimizer"
    opt = leo_dist.ShardedLion(groups_for(held, "lion"), bucket_mb=1e-4)
    state = leo_dist.hooks.attach(ddp, opt)
    forms = []

    def spy(state: leo_dist.hooks.HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        forms.append(type(bucket).__name__)
        return leo_dist.hooks.reduce_scatter_hook(state, bucket)

    ddp._comm_hooks[:] = [(spy, state)]  # what compiled_accum_grad_hook iterates
    foreign_grads = []
    for step in range(STEPS):
        ddp([local_grad(step, rank, p.shape, True) for p in net.ps]).backward()
        foreign_grads.append([p.grad.clone() for p in foreign])
        opt.step()
        opt.zero_grad()
        for p in foreign:
            p.grad = None
    return [p.detach().clone() for p in held], foreign_grads, sorted(set(forms))


def test_hook_handles_the_compiled_autograd_tuple_form():
    world = 2
    out = run_ranks(_python_reducer, world)
    assert out[0][2] == ["tuple"], out[0][2]
    assert params_hash(out[0][0]) == params_hash(out[1][0])
    params = make_params()
    held = params[:6]
    opt = leo_dist.Lion(groups_for(held, "lion"))
    for step in range(STEPS):
        for p in held:
            p.grad = sum(local_grad(step, r, p.shape, True) for r in range(world)) / world
        opt.step()
    for got, want in zip(out[0][0], held):
        assert torch.equal(got, want.detach())  # dyadic gradients: exact
    for step, grads in enumerate(out[0][1]):
        for g, p in zip(grads, params[6:]):
            assert torch.equal(g, sum(local_grad(step, r, p.shape, True) for r in range(world)) / world)


def _pickle_state(rank, world):
    net = GradProbe(make_params())
    ddp = DDP(net)
    opt = leo_dist.ShardedLion(ddp.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    state = leo_dist.hooks.attach(ddp, opt, grad_scaler=scaler)
    back = pickle.loads(pickle.dumps(state))
    out = {"optimizer": back.optimizer, "scale": back.grad_scaler.get_scale()}
    try:
        leo_dist.hooks.reduce_scatter_hook(back, (net.ps[0].grad, net.ps[0]))
    except RuntimeError as e:
        out["unbound"] = str(e)
    back.bind(opt)
    out["rebound"] = back.optimizer is opt and back.exchange is opt._exchange
    pickle.dumps(ddp)  # DDP pickles its comm hooks with their state: the optimizer must not come along
    return out


def test_hook_state_pickles_without_the_optimizer():
    for out in run_ranks(_pickle_state, 2):
        assert out["optimizer"] is None and out["scale"] == 256.0
        assert "bind" in out["unbound"] and out["rebound"]


def _mesh_run(rank, world, use_mesh):
    from torch.distributed.device_mesh import init_device_mesh

    errors = {}
    group = init_device_mesh("cpu", (world,)) if use_mesh else None
    params = make_params()
    opt = leo_dist.ShardedLeo(groups_for(params, "leo"), process_group=group, bucket_mb=1e-4)
    for step in range(STEPS):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, False)
        opt.step()
    if use_mesh:
        try:
            leo_dist.ShardedLion(make_params(), process_group=init_device_mesh("cpu", (1, world)))
        except ValueError as e:
            errors["2d"] = str(e)
        try:
            leo_dist.ShardedLion(make_params(), process_group="world")
        except TypeError as e:
            errors["type"] = str(e)
        net = GradProbe(make_params())
        ddp = DDP(net, device_mesh=group)
        hooked = leo_dist.ShardedLion(ddp.parameters(), process_group=group)
        leo_dist.hooks.attach(ddp, hooked)
        ddp([local_grad(0, rank, p.shape, True) for p in net.ps]).backward()
        hooked.step()
        errors["replicas"] = hooked.verify_replicas()
        g = torch.full((3,), float(rank))
        probe = torch.nn.Parameter(torch.zeros(3))
        probe.grad = g
        leo_dist.average_gradients([probe], process_group=group)
        errors["average"] = probe.grad.tolist() == [(world - 1) / 2] * 3
    return [p.detach().clone() for p in params], errors


def test_device_mesh_is_accepted_as_process_group():
    world = 2
    with_mesh = run_ranks(_mesh_run, world, True)
    plain = run_ranks(_mesh_run, world, False)
    for a, b in zip(with_mesh[0][0], plain[0][0]):
        assert torch.equal(a, b)
    errors = with_mesh[0][1]
    assert "1-D" in errors["2d"] and "DeviceMesh" in errors["type"] and errors["replicas"] and errors["average"]


class _WatchedScaler(torch.amp.GradScaler):
    """A GradScaler that records every private attribute read from leo_dist's code."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "leo_dist_reads", [])

    def __getattribute__(self, name):
        if name.startswith("_") and not name.startswith("__"):
            caller = sys._getframe(1).f_code.co_filename
            if os.sep + "leo_dist" + os.sep in caller:
                object.__getattribute__(self, "leo_dist_reads").append(name)
        return super().__getattribute__(name)


def _amp_protocol(rank, world, use_ddp):
    net = GradProbe(make_params())
    model = DDP(net) if use_ddp else net
    opt = leo_dist.ShardedLion(net.parameters())
    scaler = _WatchedScaler("cpu", init_scale=8.0)
    if use_ddp:
        leo_dist.hooks.attach(model, opt, grad_scaler=scaler)
    twin = GradProbe(make_params())  # the same steps without AMP: dyadic gradients, scale 8: exact
    twin_opt = leo_dist.ShardedLion(twin.parameters())
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            grads = [local_grad(step, rank, p.shape, True) for p in net.ps]
            scaler.scale(model(grads)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            twin(grads).backward()
            twin_opt.step()
            twin_opt.zero_grad()
    moved = all(torch.equal(a, b) for a, b in zip(net.ps, twin.ps)) and opt.skipped_steps == 0
    left = [n for n in ("grad_scale", "found_inf") if hasattr(opt, n)]
    return (before == list(warnings.filters), [w.category.__name__ for w in caught], scaler.leo_dist_reads,
            moved, left, "grad_scaler" in inspect.signature(opt.step).parameters)


@pytest.mark.parametrize("use_ddp", [False, True])
def test_grad_scaler_current_protocol_without_keyword_private_fields_or_filters(use_ddp):
    # GradScaler's successor protocol (grad_scale/found_inf set on the optimizer, see leo_dist/amp.py):
    # no grad_scaler= keyword (so no FutureWarning), no private scaler field read by leo_dist, no
    # warnings filter installed; the steps ran and the protocol's attributes are gone afterwards.
    for same_filters, categories, private_reads, moved, left, keyword in run_ranks(_amp_protocol, 2, use_ddp):
        assert same_filters and "FutureWarning" not in categories
        assert private_reads == []
        assert (moved, left, keyword) == (True, [], False)


def _amp_misuse(rank, world):
    errors = {}
    net = GradProbe(make_params())
    ddp = DDP(net)
    opt = leo_dist.ShardedLion(net.parameters())
    leo_dist.hooks.attach(ddp, opt)  # no grad_scaler: the hook would average scaled gradients
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(ddp([local_grad(0, rank, p.shape, True) for p in net.ps])).backward()
    before = [p.detach().clone() for p in net.ps]
    try:
        scaler.step(opt)
    except RuntimeError as e:
        errors["hook_without_scaler"] = str(e)
    errors["untouched"] = all(torch.equal(a, p.detach()) for a, p in zip(before, net.ps))
    alone = GradProbe(make_params())
    opt2 = leo_dist.ShardedLion(alone.parameters())
    scaler.scale(alone([local_grad(0, rank, p.shape, True) for p in alone.ps])).backward()
    opt2.clip_grad_norm_(1.0)  # before scaler.unscale_(opt2): it clipped scaled gradients
    try:
        scaler.step(opt2)
    except RuntimeError as e:
        errors["clip_before_unscale"] = str(e)
    return errors


def test_grad_scaler_misuse_raises():
    for errors in run_ranks(_amp_misuse, 2):
        assert "hooks.attach(ddp_model, optimizer, grad_scaler=scaler)" in errors["hook_without_scaler"]
        assert errors["untouched"]
        assert "scaler.unscale_(opt) before opt.clip_grad_norm_" in errors["clip_before_unscale"]
