"""One optimizer for the whole model: param groups with ``"algorithm": "adamw"`` next to Leo/Lion
groups, against single-process Leo/Lion plus ``torch.optim.AdamW`` fed the averaged gradients
(gloo, W = 1, 2, 3); checkpoints saved at W=2 and resumed at W=1 and W=3; ``leo_dist.prepare``."""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import averaged_grad, local_grad, make_params, params_hash, rel_err

# A model-like list: an embedding, matrices, biases, a norm weight, and one parameter ("dead") that
# never gets a gradient. Matrices take Leo's (Lion's) rule; the rest two AdamW groups, one with
# its own hyperparameters, one with none (AdamW's defaults; the optimizer's lr).
NAMES = ["emb", "w1", "b1", "w2", "b2", "ln", "w3", "b3", "dead"]
SHAPES = [(10, 6), (7, 13), (13,), (16, 9), (9,), (4,), (11, 4), (5,), (3,)]
MATRICES, ADAMW_OWN, ADAMW_DEFAULT = ["w1", "w2", "w3"], ["emb", "b1", "b2", "dead"], ["ln", "b3"]
DEAD = NAMES.index("dead")
LR = {"leo": 1e-3, "lion": 1e-4}  # the optimizers' default lr, which the default AdamW group takes
STEPS, HALF = 6, 3
BUCKET_MB = 1e-4  # 26 elements: parameters split across ranks, some ranks own only padding
# (kind, grad_comm, update_comm); the lossy config is compared on its AdamW parameters only
CONFIGS = [("leo", "fp32", "exact"), ("lion", "fp32", "exact"), ("leo", "bf16", "1bit")]


def _groups(params, kind):
    by = dict(zip(NAMES, params))
    return [{"params": [by[n] for n in MATRICES]},
            {"params": [by[n] for n in ADAMW_OWN], "algorithm": "adamw", "lr": 1e-2, "betas": (0.8, 0.99),
             "weight_decay": 0.1},
            {"params": [by[n] for n in ADAMW_DEFAULT], "algorithm": "adamw"}]


def _sharded(params, kind, grad_comm="fp32", update_comm="exact"):
    if kind == "lion":
        return leo_dist.ShardedLion(_groups(params, kind), bucket_mb=BUCKET_MB, grad_comm=grad_comm)
    return leo_dist.ShardedLeo(_groups(params, kind), bucket_mb=BUCKET_MB, grad_comm=grad_comm,
                               update_comm=update_comm)


def _oracle(kind, world, steps, dyadic=False, wire=torch.float32):
    """Single-process Leo/Lion on the matrices, torch.optim.AdamW on the rest."""
    params = make_params(SHAPES)
    groups = _groups(params, kind)
    main = (leo_dist.Leo if kind == "leo" else leo_dist.Lion)([groups[0]])
    adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != "algorithm"} for g in groups[1:]], lr=LR[kind])
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i == DEAD else averaged_grad(step, world, p.shape, dyadic, wire)
        main.step()
        adamw.step()
    return [p.detach().clone() for p in params], adamw


def _set_grads(params, step, rank, dyadic=False):
    for i, p in enumerate(params):
        p.grad = None if i == DEAD else local_grad(step, rank, p.shape, dyadic)


def _train(rank, world):
    out = []
    for kind, grad_comm, update_comm in CONFIGS:
        params = make_params(SHAPES)
        opt = _sharded(params, kind, grad_comm, update_comm)
        same = []
        for step in range(STEPS):
            _set_grads(params, step, rank)
            opt.step()
            same.append(opt.verify_replicas())
        opt.consolidate_state_dict(to=0)
        out.append(([p.detach().clone() for p in params], all(same), opt.state_dict() if rank == 0 else None))
    return out


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.norm, self.head = nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.norm(self.fc(self.emb(x)))).square().mean()


def _prepare_vs_manual(rank, world):
    runs = []
    for use_prepare in (True, False):
        torch.manual_seed(0)
        model = _Tiny()
        kw = dict(lr=3e-3, bucket_mb=1e-3)
        if use_prepare:
            ddp, opt = leo_dist.prepare(model, "leo", rest="adamw", **kw)
        else:
            ddp = DDP(model)
            matrices = [model.fc.weight, model.head.weight]
            rest = [p for p in model.parameters() if all(p is not q for q in matrices)]
            opt = leo_dist.ShardedLeo([{"params": matrices, "orthogonalize": True, "weight_decay": 0.01},
                                       {"params": rest, "algorithm": "adamw", "weight_decay": 0.0}], **kw)
            leo_dist.hooks.attach(ddp, opt)
        g = torch.Generator().manual_seed(rank)
        for _ in range(4):
            ddp(torch.randint(0, 11, (6, 3), generator=g)).backward()
            opt.step()
            opt.zero_grad()
        runs.append((params_hash(model.parameters()), opt.verify_replicas(), [g["algorithm"] for g in opt.param_groups
                                                                              if "algorithm" in g]))
    given = DDP(_Tiny())
    return runs, leo_dist.prepare(given, "lion")[0] is given


def _check_train(outs, world):
    for ci, (kind, grad_comm, _) in enumerate(CONFIGS):
        params, same, full = outs[0][ci]
        assert same and all(o[ci][1] for o in outs), f"{CONFIGS[ci]}: replicas differ at W={world}"
        wire = torch.bfloat16 if grad_comm == "bf16" else torch.float32
        expected, adamw = _oracle(kind, world, STEPS, wire=wire)
        init = make_params(SHAPES)
        for i, (name, got, want) in enumerate(zip(NAMES, params, expected)):
            if name == "dead":
                assert torch.equal(got, init[i]), "a parameter without gradients moved"
            elif name in MATRICES:
                if grad_comm == "fp32":
                    ok = torch.equal(got, want) if kind == "lion" else rel_err(got, want) <= 2e-6
                    assert ok, (CONFIGS[ci], world, name)
            else:
                assert rel_err(got, want) <= 1e-6, (CONFIGS[ci], world, name, rel_err(got, want))
        # the full state of an AdamW parameter is torch.optim.AdamW's (plus nothing)
        # (state numbers parameters by group, as torch.optim does: the matrices first)
        torch_params = [p for g in adamw.param_groups for p in g["params"]]
        for i, (name, tp) in enumerate(zip(ADAMW_OWN + ADAMW_DEFAULT, torch_params), start=len(MATRICES)):
            entry = full["state"][i]
            assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}, entry.keys()
            if name == "dead":
                assert float(entry["step"]) == 0 and not entry["exp_avg_sq"].any() and not entry["exp_avg"].any()
                continue
            ref = adamw.state[tp]
            assert float(entry["step"]) == float(ref["step"]) == STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                assert rel_err(entry[key], ref[key]) <= 1e-6, (CONFIGS[ci], world, i, key)


def test_parity_world_of_one():
    _check_train([_train(0, 1)], 1)


@pytest.mark.parametrize("world", [2, 3])
def test_parity_replicas_and_untouched(world):
    if world == 2:
        outs = run_ranks(_train_and_prepare, 2)
        runs, returned_given = outs[0][1]
        assert returned_given, "prepare() given a DDP model must use it"
        (h_prep, ok_prep, algos), (h_manual, ok_manual, _) = runs
        assert algos == ["adamw"]
        assert ok_prep and ok_manual and h_prep == h_manual, "prepare() differs from DDP + optimizer + attach"
        assert outs[1][1][0] == runs
        outs = [o[0] for o in outs]
    else:
        outs = run_ranks(_train, world)
    _check_train(outs, world)


def _train_and_prepare(rank, world):
    return _train(rank, world), _prepare_vs_manual(rank, world)


# ----------------------------------------------------------------------------- checkpoints
def _ckpt_grads(params, step, rank, resumed_from):
    for i, p in enumerate(params):
        # a resumed run sees the averaged (dyadic, exactly summed) gradients of the first run
        p.grad = None if i == DEAD else (averaged_grad(step, resumed_from, p.shape, True) if resumed_from
                                         else local_grad(step, rank, p.shape, True))


def _save(rank, world, path):
    params = make_params(SHAPES)
    opt = _sharded(params, "leo")
    for step in range(HALF):
        _ckpt_grads(params, step, rank, None)
        opt.step()
    dcp.save({"optim": opt.sharded_state_dict()}, checkpoint_id=path)
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    mid = [p.detach().clone() for p in params]
    for step in range(HALF, STEPS):
        _ckpt_grads(params, step, rank, None)
        opt.step()
    return full, mid, [p.detach().clone() for p in params]


def _resume(rank, world, path, mid, full, first_world):
    out = []
    for how in ("dcp", "full"):
        params = make_params(SHAPES)
        with torch.no_grad():
            for p, q in zip(params, mid):
                p.copy_(q)
        opt = _sharded(params, "leo")
        if how == "dcp":
            sd = {"optim": opt.sharded_state_dict()}
            dcp.load(sd, checkpoint_id=path)
            opt.load_sharded_state_dict(sd["optim"])
        else:
            opt.load_state_dict(full)
        opt.consolidate_state_dict(to=0)
        loaded = opt.state_dict() if rank == 0 else None
        same = []
        for step in range(HALF, STEPS):
            _ckpt_grads(params, step, rank, first_world)
            opt.step()
            same.append(opt.verify_replicas())
        out.append((loaded, [p.detach().clone() for p in params], all(same)))
    return out


def test_checkpoint_at_2_resumes_at_1_and_3(tmp_path):
    path = str(tmp_path / "ckpt")
    saved, mid, final = run_ranks(_save, 2, path)[0]
    for world in (1, 3):
        outs = run_ranks(_resume, world, path, mid, saved, 2)
        for how, (loaded, params, same) in zip(("dcp", "full"), outs[0]):
            assert same and all(o[1 if how == "full" else 0][2] for o in outs), (world, how)
            for i, entry in saved["state"].items():
                assert set(loaded["state"][i]) == set(entry)
                for key, value in entry.items():
                    assert torch.equal(loaded["state"][i][key], value), (world, how, i, key)
            for name, got, want in zip(NAMES, params, final):
                if name in MATRICES:  # norms summed in another order at another world size
                    assert rel_err(got, want) <= 2e-6, (world, how, name)
                else:  # AdamW is element-wise: the uninterrupted run's bits
                    assert torch.equal(got, want), (world, how, name)


# ----------------------------------------------------------------------------- input checks
def test_group_defaults_and_bad_algorithm():
    params = make_params(SHAPES)
    lion = leo_dist.ShardedLion(_groups(params, "lion"), betas=(0.95, 0.98), weight_decay=0.5)
    own, default = lion.param_groups[1], lion.param_groups[2]
    assert (own["betas"], own["weight_decay"], own["lr"]) == ((0.8, 0.99), 0.1, 1e-2)
    # an AdamW group takes AdamW's betas/eps/weight_decay, not Lion's, and the optimizer's lr
    assert (default["betas"], default["eps"], default["weight_decay"], default["lr"]) == ((0.9, 0.999), 1e-8,
                                                                                           0.01, 1e-4)
    assert "algorithm" not in lion.param_groups[0] and lion.param_groups[0]["betas"] == (0.95, 0.98)
    assert {b.kind for b in lion.layout.buckets} == {"sign", "adamw"}
    assert lion.state_bytes()["exp_avg_sq"] > 0
    for cls, bad in ((leo_dist.ShardedLeo, "sgd"), (leo_dist.ShardedLeo, "lion"), (leo_dist.ShardedLion, "leo")):
        with pytest.raises(ValueError, match="algorithm"):
            cls([{"params": make_params(SHAPES)[:2], "algorithm": bad}])
    leo_dist.ShardedLeo([{"params": make_params(SHAPES)[:2], "algorithm": "leo"}])  # its own name is fine
    with pytest.raises(NotImplementedError, match="amsgrad"):
        leo_dist.ShardedLeo([{"params": make_params(SHAPES)[:2], "algorithm": "adamw", "amsgrad": True}])
    # a state saved with other algorithms does not load
    other = leo_dist.ShardedLion([{"params": g["params"]} for g in _groups(make_params(SHAPES), "lion")])
    with pytest.raises(ValueError, match="algorithm"):
        other.load_state_dict(lion.state_dict())


def test_prepare_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        leo_dist.prepare(3)
    with pytest.raises(ValueError, match="optimizer"):
        leo_dist.prepare(nn.Linear(2, 2), "adam")
    with pytest.raises(ValueError, match="rest"):
        leo_dist.prepare(nn.Linear(2, 2), rest="sgd")
    with pytest.raises(TypeError, match="rest"):
        leo_dist.prepare(nn.Linear(2, 2), rest=1.0)


def test_single_process_optimizers_refuse_other_algorithms():
    """A sharded state with "adamw" groups must not load into Leo/Lion and be stepped by their rule."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="algorithm"):
        leo_dist.Leo([{"params": [p], "algorithm": "adamw"}])
    assert leo_dist.Lion([{"params": [p], "algorithm": "lion"}]).param_groups[0]["algorithm"] == "lion"
    opt = leo_dist.Leo([p])
    state = opt.state_dict()
    state["param_groups"][0]["algorithm"] = "adamw"
    before = opt.state_dict()
    with pytest.raises(ValueError, match="algorithm"):
        opt.load_state_dict(state)
    assert opt.state_dict() == before  # nothing loaded


def test_prepare_sizes_buckets_for_the_model():
    # about 16 buckets per model, between 1 MiB and DDP's 25 MiB (docs/overlap.md measures why)
    from leo_dist.prepare import bucket_mb_for
    assert bucket_mb_for(nn.Linear(10, 10)) == 1.0
    assert bucket_mb_for(nn.Linear(4096, 4096)) == pytest.approx(4 * 4096 * 4097 / 2**20 / 16)
    assert bucket_mb_for(nn.Linear(20000, 20000, device="meta")) == 25.0
