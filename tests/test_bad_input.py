"""Bad input to the sharded optimizers, tried as a new user would: each is a ValueError/TypeError
naming the argument, raised before anything is modified, and (across ranks) on every rank at once
instead of a hang or a crash in a later collective."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401 - the sharded form's ShardedTensor needs it loaded
from torch import nn

import leo_dist
from conftest import run_ranks
from dist_util import groups_for, local_grad, make_params

SHARDED = [pytest.param(leo_dist.ShardedLion, id="ShardedLion"), pytest.param(leo_dist.ShardedLeo, id="ShardedLeo")]


def _kind(cls) -> str:
    return "leo" if cls is leo_dist.ShardedLeo else "lion"


def _stepped(cls, steps: int = 2, params=None):
    """An optimizer over ``make_params()`` that has taken ``steps`` steps (non-zero momentum)."""
    params = params if params is not None else make_params()
    opt = cls(groups_for(params, _kind(cls)), bucket_mb=1e-4)
    for step in range(steps):
        for p in params:
            p.grad = local_grad(step, 0, p.shape, False)
        opt.step()
    return params, opt


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params],
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
            opt._steps_done)


def _assert_unchanged(before, after):
    (p0, s0, g0, n0), (p1, s1, g1, n1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "parameters changed"
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(s0, s1)), \
        "optimizer state was (partly) loaded"
    assert g0 == g1 and n0 == n1, "param groups or step count changed"


# ----------------------------------------------------------------------------- construction
def _two():
    return nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("cls", SHARDED)
@pytest.mark.parametrize("build,exc,match", [
    (lambda a, b: [a, b, a], ValueError, r"params: .*already given at param_groups\[0\]\['params'\]\[0\]"),
    (lambda a, b: [{"params": [a]}, {"params": [b, a]}], ValueError, "more than one parameter group"),
    (lambda a, b: [{"params": []}], ValueError, "params: every param group is empty"),
    (lambda a, b: [], ValueError, "empty parameter list"),
    (lambda a, b: [a, torch.zeros(3, dtype=torch.int64)], TypeError, "params must be real floating point"),
    (lambda a, b: [a, torch.zeros(3, dtype=torch.int32)], TypeError, "params must be real floating point"),
    (lambda a, b: [a, torch.zeros(3, dtype=torch.complex64, requires_grad=True)], TypeError,
     "params must be real floating point"),
    (lambda a, b: [a, nn.Parameter(torch.empty(3, device="meta"))], ValueError, r"params must all be on one device"),
    (lambda a, b: a, TypeError, "params argument"),
], ids=["twice-in-a-group", "twice-across-groups", "only-empty-groups", "no-params", "int64", "int32",
        "complex", "two-devices", "a-tensor-not-a-list"])
def test_bad_params_are_rejected(cls, build, exc, match):
    a, b = _two()
    a0, b0 = a.detach().clone(), b.detach().clone()
    with pytest.raises(exc, match=match):
        cls(build(a, b))
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


@pytest.mark.parametrize("cls", SHARDED)
@pytest.mark.parametrize("group", ["gloo", 0, object(), torch.device("cpu")], ids=["str", "int", "object", "device"])
def test_bad_process_group_type(cls, group):
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        cls(list(_two()), process_group=group)


@pytest.mark.parametrize("cls", SHARDED)
def test_sparse_gradient_is_rejected_and_nothing_moves(cls):
    emb, lin = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2)
    params = [*emb.parameters(), *lin.parameters()]
    opt = cls(params, lr=0.1)
    lin(emb(torch.tensor([1, 2, 7]))).sum().backward()
    assert emb.weight.grad.is_sparse
    before = _snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()
    _assert_unchanged(before, _snapshot(params, opt))
    emb.weight.grad = None  # the user fixes it: the next step works
    opt.step()
    assert not torch.equal(lin.weight.detach(), before[0][1])


# ----------------------------------------------------------------------------- load_state_dict
def _transposed(sd):
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].t().contiguous()  # (7, 13) -> (13, 7): same numel
    return sd


def _last_wrong(sd):  # every entry but the last is fine: nothing may be loaded before the check fails
    last = max(sd["state"])
    sd["state"][last]["exp_avg"] = torch.zeros(sd["state"][last]["exp_avg"].numel() + 1)
    return sd


def _set(path, value):
    def edit(sd):
        target = sd
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        return sd
    return edit


def _adamw(sd):
    params = make_params()
    opt = torch.optim.AdamW(groups_for(params, "lion"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _sgd(sd):
    params = make_params()
    opt = torch.optim.SGD(groups_for(params, "lion"), lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _other_family_single(cls):
    def make(sd):
        other = leo_dist.Lion if cls is leo_dist.ShardedLeo else leo_dist.Leo
        params = make_params()
        opt = other(groups_for(params, _kind(cls)))
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return opt.state_dict()
    return make


def _other_family_sharded(cls):
    def make(sd):
        other = leo_dist.ShardedLion if cls is leo_dist.ShardedLeo else leo_dist.ShardedLeo
        return _stepped(other, 1)[1].state_dict()
    return make


BAD_STATE = [  # (id, make the bad dict from a good one, exception, match)
    ("transposed-shape", _transposed, ValueError, r"has shape \(13, 7\), its parameter has shape \(7, 13\)"),
    ("last-entry-wrong-size", _last_wrong, ValueError, "its parameter has shape"),
    ("groups-missing", lambda sd: {"state": sd["state"]}, ValueError, "param_groups"),
    ("one-group-less", lambda sd: dict(sd, param_groups=sd["param_groups"][:1]), ValueError, "1 param groups"),
    ("param-count", _set(["param_groups", 0, "params"], [0]), ValueError, r"param_groups\[0\] holds 1 param"),
    ("negative-lr", _set(["param_groups", 1, "lr"], -1.0), ValueError, "lr must be >= 0"),
    ("nan-beta", _set(["param_groups", 0, "betas"], (float("nan"), 0.9)), ValueError, r"betas\[0\]"),
    ("int-state", _set(["state", 0, "exp_avg"], torch.zeros(7, 13, dtype=torch.int64)), TypeError,
     "must be a real floating point tensor"),
    ("list-state", _set(["state", 0, "exp_avg"], [0.0] * 91), TypeError, "must be a real floating point tensor"),
    ("not-a-dict", lambda sd: list(sd.items()), TypeError, "state_dict must be a dict"),
    ("adamw", _adamw, ValueError, "saved by another optimizer"),
    ("sgd-momentum", _sgd, ValueError, "saved by another optimizer"),
]


@pytest.mark.parametrize("cls", SHARDED)
@pytest.mark.parametrize("name,make,exc,match", BAD_STATE + [
    ("other-family-single", "single", ValueError, "saved by another optimizer"),
    ("other-family-sharded", "sharded", ValueError, r"holds the state of a Sharded"),
    ("sharded-dcp-form", "dcp", ValueError, r"sharded \(DCP\) form.*load_sharded_state_dict"),
], ids=[c[0] for c in BAD_STATE] + ["other-family-single", "other-family-sharded", "sharded-dcp-form"])
def test_bad_state_dict_raises_before_loading_anything(cls, name, make, exc, match):
    _, source = _stepped(cls, 2)
    good = source.state_dict()
    if make == "single":
        make = _other_family_single(cls)
    elif make == "sharded":
        make = _other_family_sharded(cls)
    elif make == "dcp":
        make = lambda sd: source.sharded_state_dict()  # noqa: E731
    bad = make(copy.deepcopy(good))
    params, opt = _stepped(cls, 1)  # its own, different, momentum
    before = _snapshot(params, opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad)
    _assert_unchanged(before, _snapshot(params, opt))
    opt.load_state_dict(good)  # and the right one still loads
    assert all(torch.equal(opt.state[p]["exp_avg"].reshape(-1), good["state"][i]["exp_avg"].reshape(-1))
               for i, p in enumerate(params))


# ----------------------------------------------------------------------------- across ranks
MISMATCH = [  # (id, what rank 1 does differently, match) -- every rank must raise ValueError at once
    ("shape", dict(shapes=[(13, 7)]), "ranks disagree on the parameter list"),
    ("count", dict(shapes=[(7, 13), (5,)]), "ranks disagree on the parameter list"),
    ("dtype", dict(dtype=torch.bfloat16), "ranks disagree on the parameter list"),
    ("lr", dict(kw=dict(lr=1.0)), "ranks disagree on the param-group hyperparameters"),
    ("bucket_mb", dict(kw=dict(bucket_mb=25)), "ranks disagree on bucket_mb"),
    ("grad_comm", dict(kw=dict(grad_comm="bf16")), "ranks disagree on grad_comm"),
    ("grad_comm_1bit", dict(kw=dict(grad_comm="1bit")), "ranks disagree on grad_comm"),
    ("sync_params", dict(kw=dict(sync_params=False)), "ranks disagree on sync_params"),
    ("momentum_dtype", dict(kw=dict(momentum_dtype=torch.bfloat16)), "ranks disagree on momentum_dtype"),
    ("update_comm", dict(kw=dict(update_comm="1bit"), leo=True), "ranks disagree on update_comm"),
]


def _mismatched_models(rank, world):
    out = {}
    # connect the group first, so that the timings below are of the checks, not of gloo's setup
    dist.barrier()
    for name, diff, _ in MISMATCH:
        mine = diff if rank == 1 else {}
        shapes = mine.get("shapes", [(7, 13), (5,), (3, 3)])
        params = make_params(shapes, seed=rank, dtype=mine.get("dtype", torch.float32))
        before = [p.detach().clone() for p in params]
        cls = leo_dist.ShardedLeo if diff.get("leo") else leo_dist.ShardedLion
        t0 = time.monotonic()
        try:
            cls(params, **{"bucket_mb": 1e-4, **mine.get("kw", {})})
            out[name] = ("no error", None, None)
        except (ValueError, TypeError) as e:
            unchanged = all(torch.equal(p.detach(), b) for p, b in zip(params, before))  # no broadcast happened
            out[name] = (f"{type(e).__name__}: {e}", time.monotonic() - t0, unchanged)
    # the group is still usable: every rank ran the same collectives before raising
    params = make_params()
    opt = leo_dist.ShardedLion(params, bucket_mb=1e-4)
    for p in params:
        p.grad = local_grad(0, rank, p.shape, True)
    opt.step()
    out["after"] = opt.verify_replicas()
    return out


def test_mismatched_models_and_options_raise_on_every_rank_without_hanging():
    outs = run_ranks(_mismatched_models, 2, timeout=120)
    for name, _, match in MISMATCH:
        for rank, out in enumerate(outs):
            msg, elapsed, unchanged = out[name]
            assert msg.startswith("ValueError") and match in msg, (name, rank, msg)
            # one small collective, not the group's 60 s timeout (the bound leaves room for a loaded machine)
            assert elapsed < 20.0, (name, rank, elapsed)
            assert unchanged, (name, rank)
    assert all(out["after"] for out in outs)


def _dcp_form_and_wrong_shape_at_two(rank, world):
    params, opt = _stepped(leo_dist.ShardedLion, 1, make_params())
    errors = []
    for bad in (opt.sharded_state_dict(), {"state": {0: {"exp_avg": torch.zeros(13, 7)}},
                                           "param_groups": copy.deepcopy(opt.param_groups)}):
        if "param_groups" in bad:
            for i, g in enumerate(bad["param_groups"]):
                g["params"] = list(range(sum(len(x["params"]) for x in opt.param_groups[:i]),
                                         sum(len(x["params"]) for x in opt.param_groups[: i + 1])))
        before = _snapshot(params, opt)
        try:
            opt.load_state_dict(bad)
            errors.append(None)
        except (ValueError, TypeError) as e:
            _assert_unchanged(before, _snapshot(params, opt))
            errors.append(f"{type(e).__name__}: {e}")
    return errors, opt.verify_replicas()


def test_sharded_form_and_wrong_shapes_at_two_ranks():
    for errors, replicas in run_ranks(_dcp_form_and_wrong_shape_at_two, 2):
        assert "sharded (DCP) form" in errors[0] and "load_sharded_state_dict" in errors[0], errors
        assert errors[1].startswith("ValueError") and "has shape (13, 7)" in errors[1], errors
        assert replicas
