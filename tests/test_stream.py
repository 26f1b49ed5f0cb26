"""Streamed steps: with the DDP hook, ``overlap_updates=True`` and the background sender, ``step()``
decides the non-finite verdict, hands the rest of the step to the sender and returns; each bucket
is stepped as soon as its shard is complete and its update all-gather starts at once, the buckets
still unsent when step() began going in forward order (docs/overlap.md, "Streamed steps").

Every case is a parity test against the same training without overlap (``overlap_updates=False``):
losses of every forward, parameters and replicas bitwise equal. The split between the buckets
sent during backward and the ones streamed after step() is forced to every value (0, some, all),
since on an unshaped loopback the calibration alone would rarely leave a tail.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from dist_util import params_hash
from test_overlap import VOCAB, TinyLM


def _train(rank, world, overlap, kind="lion", grad_comm="fp32", limits=None, bad=None, opt_kw=None, steps=5,
           ddp_kw=None, set_to_none=True):
    """``limits``: per step, the launch limit to force (None: the optimizer's own calibration).
    ``bad``: (step, rank, value) put into one gradient element of that rank at that step."""
    model = TinyLM()
    net = DDP(model, find_unused_parameters=True, bucket_cap_mb=1e-3, **(ddp_kw or {}))
    cls = leo_dist.ShardedLeo if kind == "leo-signs" else leo_dist.ShardedLion
    kw = dict(orthogonalize=False) if kind == "leo-signs" else {}
    opt = cls(model.parameters(), lr=1e-2, bucket_mb=1e-4, overlap_updates=overlap, grad_comm=grad_comm,
              **kw, **(opt_kw or {}))
    leo_dist.hooks.attach(net, opt)
    # a scheduler changes lr right after step(): a deferred update must use the lr of its own step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    n = len(opt.layout.buckets)
    g = torch.Generator().manual_seed(rank + 1)
    losses, limits_seen, stats = [], [], []
    for step in range(steps):
        if limits is not None and overlap:
            opt._exchange.launch_limit = min(n, limits[step % len(limits)])
        limits_seen.append(opt._exchange.launch_limit)
        use = step % 2 == 0
        x = torch.randint(0, VOCAB, (4, 5), generator=g)
        loss = net(x, use)
        if bad is not None and bad[0] == step and bad[1] == rank:
            # d(loss)/d(up.bias[0]) gains bad[2] on this rank only
            loss = loss + bad[2] * model.up.bias[0]
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=set_to_none)
        if step == 1:  # (waits for the streamed step, applies nothing)
            last = opt.comm_stats()["last_step"]
            stats.append({k: v for k, v in last.items() if k.startswith(("reduce_scatter", "all_to_all", "all_gather"))})
        with torch.no_grad():  # an evaluation that stops early: later modules' updates stay pending
            losses.append(net(torch.randint(0, VOCAB, (2, 5), generator=g), shallow=True).item())
    ok = opt.verify_replicas()
    return dict(losses=losses, hash=params_hash(model.parameters()), ok=ok, buckets=n, stats=stats,
                streamed=opt._streamed_steps, skipped=opt.skipped_steps, limits=limits_seen)


def _pair(rank, world, kw):
    return _train(rank, world, False, **kw), _train(rank, world, True, **kw)


CASES = [
    (2, dict(grad_comm="fp32", limits=[0, 3, 1000, 7, 1])),
    (3, dict(grad_comm="bf16", limits=[5, 0, 2])),
    (4, dict(grad_comm="fp32", limits=[1, 1000, 4])),
    (2, dict(kind="leo-signs", grad_comm="bf16", limits=[2, 0])),
    (2, dict(grad_comm="bf16")),  # the optimizer's own calibration
    (4, dict(grad_comm="bf16", limits=[0, 6, 2], opt_kw=dict(ranks_per_node=2))),  # two levels, 2 x 2
    # .grad is DDP's bucket, zeroed in place while the streamed step may still read it
    (2, dict(grad_comm="bf16", limits=[0, 2], ddp_kw=dict(gradient_as_bucket_view=True), set_to_none=False)),
]


@pytest.mark.parametrize("world,kw", CASES, ids=[f"w{w}-{i}" for i, (w, _) in enumerate(CASES)])
def test_streamed_steps_equal_the_synchronous_ones(world, kw):
    runs = run_ranks(_pair, world, kw)
    for r, (ref, got) in enumerate(runs):
        assert ref["ok"] and got["ok"], "replicas differ"
        assert got["streamed"] == 5 and ref["streamed"] == 0, "the streamed path was not taken"
        assert got["losses"] == ref["losses"], f"rank {r}: a forward saw other parameter values"
        assert got["hash"] == ref["hash"], f"rank {r}: parameters differ after the run"
        # the same gradient and update bytes, booked in the step they belong to
        assert got["stats"] == ref["stats"] and got["stats"][0], f"rank {r}: other bytes per step"
    # the launch limit is agreed (all-reduced): the same on every rank, every step
    assert len({tuple(got["limits"]) for _, got in runs}) == 1
    if "limits" not in kw:
        assert all(0 <= lim <= runs[0][1]["buckets"] for lim in runs[0][1]["limits"])


def _deferred_with_scheduler(rank, world):
    # the deferred path without streaming (no background sender) also applies each update with
    # the lr of its own step, not the one a scheduler set after step()
    kw = dict(opt_kw=dict(overlap_grads=False))
    return _train(rank, world, False, **kw), _train(rank, world, True, **kw)


def test_deferred_updates_keep_their_steps_lr():
    for ref, got in run_ranks(_deferred_with_scheduler, 2):
        assert got["streamed"] == 0
        assert got["losses"] == ref["losses"] and got["hash"] == ref["hash"]


@pytest.mark.parametrize("value", [float("nan"), 1e38], ids=["nan", "overflow"])
def test_a_bad_gradient_skips_the_streamed_step_everywhere(value):
    # rank 1's gradient at step 2 is NaN, or 1e38: finite, but at W=2 at or above
    # float32-max / 2W, where a sum of W such elements could overflow: the streamed verdict,
    # taken on local gradients before any bucket is averaged, skips it on every rank
    def check(runs, skipped):
        for ref, got in runs:
            assert got["ok"] and got["skipped"] == 1 and got["streamed"] == 4
            if skipped:
                # (the bad step's loss is NaN on rank 1: compared as text)
                assert ref["skipped"] == 1 and got["hash"] == ref["hash"]
                assert list(map(repr, got["losses"])) == list(map(repr, ref["losses"]))
    runs = run_ranks(_pair, 2, dict(grad_comm="bf16", limits=[1, 0, 3], bad=(2, 1, value)))
    check(runs, skipped=value != value)
    if value == value:  # the synchronous path averages 1e38 without overflow and takes the step
        assert runs[0][0]["skipped"] == 0


def _not_streamed(rank, world):
    out = {}
    for name, kw in {"leo matrices": dict(kind="leo"), "1bit": dict(grad_comm="1bit"),
                     "no sender": dict(opt_kw=dict(overlap_grads=False))}.items():
        model = TinyLM()
        net = DDP(model, find_unused_parameters=True, bucket_cap_mb=1e-3)
        cls = leo_dist.ShardedLeo if kw.get("kind") == "leo" else leo_dist.ShardedLion
        opt = cls(model.parameters(), bucket_mb=1e-4, overlap_updates=True, grad_comm=kw.get("grad_comm", "fp32"),
                  **kw.get("opt_kw", {}))
        leo_dist.hooks.attach(net, opt)
        net(torch.randint(0, VOCAB, (4, 5))).backward()
        opt.step()
        out[name] = opt._streamed_steps
    return out


def test_what_is_not_streamed():
    # Leo's matrices need their norms over all shards; 1-bit gradients and the in-hook exchange
    # take the deferred path of overlap_updates (still exact, updates still overlapped)
    for out in run_ranks(_not_streamed, 2):
        assert out == {"leo matrices": 0, "1bit": 0, "no sender": 0}


def _peer_dies_mid_stream(rank, world, store_path):
    import datetime
    import os
    import time

    import torch.distributed as dist
    pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10))
    model = TinyLM()
    net = DDP(model, process_group=pg, find_unused_parameters=True, bucket_cap_mb=1e-3)
    opt = leo_dist.ShardedLion(model.parameters(), process_group=pg, bucket_mb=1e-4, overlap_updates=True)
    leo_dist.hooks.attach(net, opt)
    g = torch.Generator().manual_seed(rank + 1)
    for step in range(3):
        opt._exchange.launch_limit = 0  # the whole step is streamed after step() returns
        net(torch.randint(0, VOCAB, (4, 5), generator=g)).backward()
        opt.step()
        if step == 2 and rank == 1:
            os._exit(17)  # dies while its sender streams: no goodbye
        opt.zero_grad()
    t0 = time.time()
    try:
        net(torch.randint(0, VOCAB, (4, 5), generator=g))  # the forward waits for the updates
        opt.synchronize()
    except RuntimeError as e:
        return {"message": str(e), "waited": time.time() - t0}
    return {"message": "", "waited": time.time() - t0}


def test_a_peer_that_dies_mid_stream_makes_the_forward_raise(tmp_path):
    from test_faults import run_with_fault
    out = run_with_fault(_peer_dies_mid_stream, 2, str(tmp_path / "store"), dies=(1,), timeout=120)
    assert out[1] == 17
    assert "streamed step failed on the background sender" in out[0]["message"], out[0]
    assert out[0]["waited"] < 30, out[0]


def test_a_failed_wait_on_a_streamed_bucket_is_the_same_report_and_sticks():
    # which of the two sees a dead peer first, the sender or the forward's wait, is a race:
    # either way the forward raises the same report, and later waits raise as well
    from leo_dist.deferred import DeferredUpdates
    from leo_dist.partition import Layout

    class Broken:
        def finish(self):
            raise leo_dist.collectives.CollectiveError("bucket 0", RuntimeError("Read error"))

    class Applied:
        done = False

        def finish(self):
            self.done = True

    deferred = DeferredUpdates(Layout([[(torch.zeros(4), "sign")]], world=1, rank=0, bucket_bytes=64))
    deferred.expect([0, 1])
    deferred.publish(0, Broken())
    deferred.publish(1, applied := Applied())
    with pytest.raises(RuntimeError, match=r"streamed step failed on the background sender \(CollectiveError: bucket 0"):
        deferred.complete([0])
    with pytest.raises(RuntimeError, match="streamed step failed"):
        deferred.wait_done()
    assert not applied.done
    # a bucket that step() itself left in flight (not streamed) raises its own error unchanged
    deferred.expect([])
    deferred.end(None)
    deferred._pending[0] = Broken()
    with pytest.raises(leo_dist.collectives.CollectiveError, match="^bucket 0: RuntimeError: Read error"):
        deferred.complete([0])
