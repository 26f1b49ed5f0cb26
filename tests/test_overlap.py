"""``overlap_updates=True``: the update all-gathers travel past ``step()`` and each bucket is applied
in the next forward, before the first module that owns one of its parameters.

Every case is a parity test against the same run without overlap: the losses of every forward
(which read the parameters through their modules) and the parameters after the run are bitwise
equal, replicas are identical, at W = 1–3, with the DDP hook and standalone, with gradient
accumulation, an evaluation forward under ``torch.no_grad()`` that skips modules, a module that
gets no gradient in some steps, and an embedding tied to the output layer.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import params_hash

VOCAB, DIM = 11, 8


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, 16)
        self.sometimes = nn.Linear(16, 16)   # used on even steps only: no gradient anywhere on odd ones
        self.down = nn.Linear(16, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight   # tied

    def forward(self, x, use_sometimes: bool = True, shallow: bool = False):
        h = torch.tanh(self.up(self.emb(x)))
        if shallow:  # an evaluation that stops early: later modules do not run
            return h.square().mean()
        if use_sometimes:
            h = torch.tanh(self.sometimes(h))
        return self.head(self.down(h)).logsumexp(-1).mean()


def _run(rank, world, kind, overlap, hook, steps=4, opt_kw=None):
    opt_kw = opt_kw or {}
    model = TinyLM()
    net = DDP(model, find_unused_parameters=True, bucket_cap_mb=1e-3) if hook else model
    cls = leo_dist.ShardedLeo if kind.startswith("leo") else leo_dist.ShardedLion
    kw = {"update_comm": "1bit"} if kind == "leo-1bit" else {}
    opt = cls(model.parameters(), lr=1e-2, bucket_mb=1e-4, overlap_updates=overlap, **kw, **opt_kw)
    if opt_kw.get("overlap_grads") is not None and world > 1 and opt.overlap_grads != opt_kw["overlap_grads"]:
        raise AssertionError("overlap_grads was not honoured")
    if hook:
        leo_dist.hooks.attach(net, opt)
    elif overlap:
        opt.register_model(model)
    g = torch.Generator().manual_seed(rank + 1)
    losses, stale = [], []
    for step in range(steps):
        use = step % 2 == 0
        for micro in range(2):  # accumulation: the first micro-batch does not sync
            x = torch.randint(0, VOCAB, (4, 5), generator=g)
            if hook and micro == 0:
                with net.no_sync():
                    loss = net(x, use)
                    loss.backward()
            else:
                loss = net(x, use)
                loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        if overlap and step == 2:  # (odd steps leave a module without gradient: applied in step())
            # a bias takes the sign rule in every mode, so its update is deferred; read raw, before
            # any forward: the old values
            before = model.down.bias.detach().clone()
            opt.synchronize()
            stale.append(not torch.equal(before, model.down.bias.detach()))
        with torch.no_grad():
            losses.append(net(torch.randint(0, VOCAB, (2, 5), generator=g), shallow=True).item())
    ok = opt.verify_replicas()
    return losses, [p.detach().clone() for p in model.parameters()], params_hash(model.parameters()), ok, stale


def _pair(rank, world, kind, hook, ref, got):
    """Two runs in one spawn: ``ref`` and ``got`` are each ``(overlap_updates, optimizer keywords)``."""
    return _run(rank, world, kind, ref[0], hook, 4, ref[1]), _run(rank, world, kind, got[0], hook, 4, got[1])


CASES = [(1, "lion", False, "fp32"), (2, "lion", True, "fp32"), (2, "leo", False, "bf16"),
         (3, "leo-1bit", True, "fp32"), (4, "lion", True, "1bit")]


@pytest.mark.parametrize("world,kind,hook,grad_comm", CASES,
                         ids=[f"w{w}-{k}-{'hook' if h else 'standalone'}-{g}" for w, k, h, g in CASES])
def test_overlapped_updates_equal_the_synchronous_ones(world, kind, hook, grad_comm):
    kw = dict(grad_comm=grad_comm, grad_comm_warmup=1)
    runs = run_ranks(_pair, world, kind, hook, (False, kw), (True, kw))
    ref, got = [r[0] for r in runs], [r[1] for r in runs]
    for r in range(world):
        assert got[r][3] and ref[r][3], "replicas differ"
        assert got[r][0] == ref[r][0], f"rank {r}: a forward saw other parameter values with overlap"
        assert got[r][2] == ref[r][2], f"rank {r}: parameters differ after the run"
    assert got[0][2] == got[-1][2]
    # the deferral is real: right after step() a raw read still sees the old weights
    assert got[0][4] == [True]


GRAD_CASES = [(2, "lion", True, "bf16", False), (3, "leo", True, "1bit", True), (3, "lion", False, "fp32", False),
              (2, "leo-1bit", True, "fp32", True)]


@pytest.mark.parametrize("world,kind,hook,grad_comm,overlap", GRAD_CASES,
                         ids=[f"w{w}-{k}-{'hook' if h else 'standalone'}-{g}-{'overlap' if o else 'sync'}"
                              for w, k, h, g, o in GRAD_CASES])
def test_background_gradient_exchange_equals_the_in_hook_one(world, kind, hook, grad_comm, overlap):
    # overlap_grads (leo_dist.sender: the exchange sent from a background thread on a group of
    # its own) changes when bytes leave, never which: losses and parameters bitwise equal
    kw = dict(grad_comm=grad_comm, grad_comm_warmup=1)
    runs = run_ranks(_pair, world, kind, hook, (overlap, dict(kw, overlap_grads=False)),
                     (overlap, dict(kw, overlap_grads=True)))
    ref, got = [r[0] for r in runs], [r[1] for r in runs]
    for r in range(world):
        assert got[r][3] and ref[r][3], "replicas differ"
        assert got[r][0] == ref[r][0] and got[r][2] == ref[r][2], f"rank {r} differs with the background sender"


def _no_model(rank, world):
    p = nn.Parameter(torch.ones(4))
    opt = leo_dist.ShardedLion([p], overlap_updates=True)
    p.grad = torch.ones(4)
    try:
        opt.step()
    except RuntimeError as e:
        msg = str(e)
    else:
        msg = ""
    try:
        leo_dist.ShardedLion([nn.Parameter(torch.ones(4))], overlap_updates="yes")
    except TypeError as e:
        msg += " | " + str(e)
    try:
        leo_dist.ShardedLion([nn.Parameter(torch.ones(4))], overlap_grads=1)
    except TypeError as e:
        msg += " | " + str(e)
    return msg


def test_overlap_without_a_model_raises():
    msg = run_ranks(_no_model, 1)[0]
    assert "register_model" in msg and "overlap_updates must be a bool" in msg
    assert "overlap_grads must be None or a bool" in msg
