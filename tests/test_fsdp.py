"""Leo/Lion on FSDP2 (fully_shard) parameters against the single-process oracle, gloo on CPU.

FSDP2 shards every parameter along dim 0 with torch.chunk semantics, so the shapes below give
uneven shards and ranks holding no rows at all ((1, 33) at W=2, (4, 6) and (2, 9) at W=3). The
module's loss is Σ p·G_rank, so FSDP2's reduce-scatter hands each rank its shard of mean(G) and the
oracle (leo_dist.Leo / Lion on plain tensors) is fed exactly that mean. One spawn per world size
runs every scenario; the tests below check its results.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import leo_dist
import leo_dist.fsdp
from tests.conftest import run_ranks
from tests.dist_util import averaged_grad, local_grad, rel_err

STEPS = 12
# (shape, group): group 0 Leo 2-D rule (default hyperparameters), 1 sign rule with its own
# hyperparameters, 2 a second 2-D group with other hyperparameters (shares the norm all-reduces).
LAYOUT = [((7, 13), 0), ((1, 33), 0), ((4, 6), 0), ((5,), 0), ((2, 3, 5), 0), ((5, 3), 0),
          ((11, 4), 1), ((3,), 1), ((1,), 1), ((2, 9), 1),
          ((3, 7), 2), ((2,), 2)]
HPARAMS = {
    "leo": [{}, {"lr": 2e-3, "betas": (0.8, 0.95), "weight_decay": 0.05, "orthogonalize": False},
            {"lr": 5e-4, "weight_decay": 0.0, "align_const": 0.3, "eps": 1e-6}],
    "lion": [{}, {"lr": 3e-4, "betas": (0.85, 0.98), "weight_decay": 0.1}, {"lr": 1e-4, "weight_decay": 0.02}],
}
SHAPES = [s for s, _ in LAYOUT]
MATRIX = [i for i, (s, g) in enumerate(LAYOUT) if len(s) == 2 and g != 1]   # Leo's 2-D rule
SIGN = [i for i in range(len(LAYOUT)) if i not in MATRIX]
TOL = 2e-6
PLACEMENT_SHAPES = [(5, 7), (3, 2), (6, 4), (5, 3)]


def _init(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _groups(params, kind):
    return [dict(params=[p for p, (_, gi) in zip(params, LAYOUT) if gi == k], **HPARAMS[kind][k])
            for k in range(3)]


class GradProbe(nn.Module):
    """loss = Σ p·G: backward leaves G in each parameter's gradient, so the test chooses them."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", nn.Parameter(t.clone()))

    def plist(self):
        return [getattr(self, f"p{i}") for i in range(len(SHAPES))]

    def forward(self, grads):
        return sum((p * g).sum() for p, g in zip(self.plist(), grads))


def _oracle(kind, world, steps=STEPS):
    params = [t.clone().requires_grad_() for t in _init()]
    cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
    opt = cls(_groups(params, kind))
    for step in range(steps):
        for p in params:
            p.grad = averaged_grad(step, world, p.shape, True)
        opt.step()
    return [p.detach().clone() for p in params], [opt.state[p]["exp_avg"].clone() for p in params]


def _fsdp_model(mesh, custom_rs=False):
    from torch.distributed.fsdp import fully_shard

    net = GradProbe(_init())
    fully_shard(net, mesh=mesh)
    if custom_rs:
        net.set_custom_reduce_scatter(leo_dist.fsdp.AllToAllReduceScatter())
    return net


def _train(net, opt, rank, steps, start=0):
    for step in range(start, start + steps):
        net([local_grad(step, rank, s, True) for s in SHAPES]).backward()
        opt.step()
        opt.zero_grad()


def _full(net):
    return [p.detach().full_tensor().clone() for p in net.plist()]


def _placement_run(rank, world, mesh):
    """Shard(1) and Replicate matrices (no FSDP): DTensors built directly, oracle gradients set by hand."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torch.distributed.device_mesh import init_device_mesh

    # HSDP's layout: a replicate mesh dim (size 1 here) and a shard mesh dim; norms reduce over the latter only.
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    meshes = [mesh, mesh, mesh, mesh2]
    placements = [[Shard(1)], [Shard(1)], [Replicate()], [Replicate(), Shard(0)]]
    g0 = torch.Generator().manual_seed(5)
    full = [torch.randn(s, generator=g0) for s in PLACEMENT_SHAPES]
    params = [nn.Parameter(distribute_tensor(t.clone(), m, pl)) for t, m, pl in zip(full, meshes, placements)]
    opt = leo_dist.Leo(params)
    for step in range(STEPS):
        for p, m, pl in zip(params, meshes, placements):
            p.grad = distribute_tensor(averaged_grad(step, world, p.shape, True), m, pl)
        opt.step()
    both = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)]))
    both.grad = distribute_tensor(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)])
    try:
        leo_dist.Leo([both]).step()
        refusal = None
    except NotImplementedError as e:
        refusal = str(e)
    return [p.detach().full_tensor() for p in params], refusal


def _refusals(mesh):
    from torch.distributed.tensor import DTensor, Partial

    out = {}
    p = nn.Parameter(DTensor.from_local(torch.ones(2, 3), mesh, [Partial()], run_check=False))
    p.grad = DTensor.from_local(torch.ones(2, 3), mesh, [Partial()], run_check=False)
    try:
        leo_dist.Leo([p]).step()
        out["partial"] = None
    except NotImplementedError as e:
        out["partial"] = str(e)
    mixed = leo_dist.Leo([p, nn.Parameter(torch.ones(2))])
    mixed.param_groups[0]["params"][1].grad = torch.ones(2)
    try:
        mixed.step()
        out["mixed"] = None
    except TypeError as e:
        out["mixed"] = str(e)
    return out


def _run_all(rank, world):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for kind, custom in (("leo", False), ("leo", True), ("lion", False)):
        net = _fsdp_model(mesh, custom_rs=custom)
        cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
        opt = cls(_groups(net.plist(), kind))
        _train(net, opt, rank, STEPS)
        res[(kind, custom)] = _full(net)
        if kind == "leo" and not custom:
            res["local_rows"] = [p.to_local().shape[0] for p in net.plist()]
            res["stats"] = leo_dist.fsdp.comm_stats(opt)
            res["state_types"] = {type(opt.state[p]["exp_avg"]).__name__ for p in net.plist()}
            res["placements_kept"] = all(
                isinstance(opt.state[p]["exp_avg"], DTensor) and opt.state[p]["exp_avg"].placements == p.placements
                for p in net.plist())
            full_opts = StateDictOptions(full_state_dict=True)
            osd = get_optimizer_state_dict(net, opt, options=full_opts)
            res["full_momentum"] = [osd["state"][f"p{i}"]["exp_avg"].clone() for i in range(len(SHAPES))]
            # Resume in a fresh model/optimizer from the sharded state dict; one more step must agree bitwise.
            sharded = get_optimizer_state_dict(net, opt)
            net2 = _fsdp_model(mesh)
            with torch.no_grad():
                for a, b in zip(net2.plist(), net.plist()):
                    a.to_local().copy_(b.to_local())
            opt2 = leo_dist.Leo(_groups(net2.plist(), "leo"))
            set_optimizer_state_dict(net2, opt2, sharded)
            _train(net, opt, rank, 1, start=STEPS)
            _train(net2, opt2, rank, 1, start=STEPS)
            res["resume_equal"] = all(torch.equal(a, b) for a, b in zip(_full(net), _full(net2)))
    res["placements"] = _placement_run(rank, world, mesh)
    res["refusals"] = _refusals(mesh)
    return res


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def fsdp_run(request):
    world = request.param
    return world, run_ranks(_run_all, world)


def _check(params, ref, idx, tol=TOL):
    for i in idx:
        err = rel_err(params[i], ref[i])
        assert err <= tol, f"param {i} {SHAPES[i]}: rel err {err:.3g} > {tol}"


def test_shards_are_uneven_with_empty_ranks(fsdp_run):
    world, res = fsdp_run
    rows = [r["local_rows"] for r in res]
    for i, shape in enumerate(SHAPES):
        assert sum(r[i] for r in rows) == shape[0]
    assert any(r[i] == 0 for r in rows for i in MATRIX), "some rank must hold no rows of a matrix"


@pytest.mark.parametrize("kind,custom", [("leo", False), ("leo", True), ("lion", False)],
                         ids=["leo", "leo-alltoall-rs", "lion"])
def test_parity_with_oracle(fsdp_run, kind, custom):
    world, res = fsdp_run
    ref, _ = _oracle(kind, world)
    for r in res:
        got = r[(kind, custom)]
        _check(got, ref, range(len(SHAPES)))
        if custom or world == 2:
            # Averages are bit-exact here (rank-order sum / W, or dyadic halves): sign steps are bitwise.
            for i in (SIGN if kind == "leo" else range(len(SHAPES))):
                assert torch.equal(got[i], ref[i]), f"param {i} {SHAPES[i]} not bitwise equal"
    for r in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r[(kind, custom)], res[0][(kind, custom)]))


def test_momentum_state_dict(fsdp_run):
    world, res = fsdp_run
    _, ref_m = _oracle("leo", world)
    for r in res:
        assert r["state_types"] == {"DTensor"} and r["placements_kept"]
        _check(r["full_momentum"], ref_m, range(len(SHAPES)))
        assert r["resume_equal"]


def test_norm_all_reduces_are_batched(fsdp_run):
    world, res = fsdp_run
    st = res[0]["stats"]
    assert st["steps"] == STEPS
    ar = st["last_step"]["all_reduce"]
    # one all-reduce of every matrix's column sums (dim 0 is sharded), one of Σu² per matrix
    cols, mats = 4 * sum(SHAPES[i][1] for i in MATRIX), 4 * len(MATRIX)
    assert ar["calls"] == 2
    assert ar["bytes_in"] == cols + mats
    assert ar["sent"] == sum(2 * (world - 1) * b // world for b in (cols, mats))


def test_shard1_replicate_and_hsdp_placements(fsdp_run):
    world, res = fsdp_run
    from tests.dist_util import averaged_grad as ag

    g0 = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g0).requires_grad_() for s in PLACEMENT_SHAPES]
    opt = leo_dist.Leo(params)
    for step in range(STEPS):
        for p in params:
            p.grad = ag(step, world, p.shape, True)
        opt.step()
    for r in res:
        got, refusal = r["placements"]
        for g, ref in zip(got, params):
            assert rel_err(g, ref.detach()) <= TOL
        assert refusal and "both dims" in refusal


def test_unsupported_layouts_fail_loudly(fsdp_run):
    _, res = fsdp_run
    for r in res:
        assert r["refusals"]["partial"] and "Partial" in r["refusals"]["partial"]
        assert r["refusals"]["mixed"] and "mixes DTensor and plain" in r["refusals"]["mixed"]
