"""torch's current protocols: the compiled-autograd form of DDP comm hooks, picklable hook state
(as PowerSGDState), a 1-D DeviceMesh wherever a process group goes, GradScaler without a
process-wide warnings filter."""
from __future__ import annotations

import pickle
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


def _amp_filters(rank, world):
    params = make_params()
    opt = leo_dist.ShardedLion(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.scale(sum((p * p).sum() for p in params)).backward()
        scaler.step(opt)
        scaler.update()
        inner = list(warnings.filters)
    return before == list(warnings.filters), len(inner), [str(w.category.__name__) for w in caught]


def test_grad_scaler_protocol_installs_no_warnings_filter():
    # leo_dist keeps GradScaler's grad_scaler= keyword protocol (see leo_dist/amp.py: the newer
    # grad_scale/found_inf attributes give the optimizer no way to write the cross-rank verdict back
    # into the scaler): torch's FutureWarning is shown, and never filtered process-wide.
    for same, _, categories in run_ranks(_amp_filters, 2):
        assert same
        assert "FutureWarning" in categories
