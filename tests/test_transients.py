"""Bounded transients (docs/design.md, "Memory model"): after the first step no step of a sharded optimizer
allocates a bucket-sized tensor, standalone or under the DDP hook.

Every tensor that an aten op creates with fresh storage while a step (or, with the hook, a
backward and a step) runs is tracked by a ``TorchDispatchMode`` until it is freed
(``weakref.finalize``): the largest single allocation and the peak of the bytes those tensors
hold at once. Byte counts, not time or RSS, so the test is deterministic on a shared machine.
The reused buffers (averaged shards, the send/receive pool, scratch blocks) are created in the
first step, which is not measured.
"""
from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import leo_dist
import leo_dist.hooks
from conftest import run_ranks
from leo_dist.exchange import CHUNK_ELEMS

BUCKET_MB = 8                  # 2M-element buckets: four times a block (CHUNK_ELEMS)
SHAPES = [(2048, 1024), (1024, 1024), (1024,), (1536, 1024), (999,)]


_LEO = os.sep + "leo_dist" + os.sep


def _from_leo_dist() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if _LEO in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class AllocationTracker(TorchDispatchMode):
    """Largest fresh allocation and peak live bytes of the tensors that leo_dist's code creates
    inside the mode (the model's own forward/backward tensors are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _from_leo_dist():
            return out
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t._is_view():
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen or st.nbytes() == 0:
                continue
            seen.add(st.data_ptr())
            n = st.nbytes()
            self.largest = max(self.largest, n)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, n)
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in SHAPES])

    def forward(self, grads):
        return sum((p * g).sum() for p, g in zip(self.ps, grads))


def _measure(rank, world, kind, kw, hook):
    net = Net()
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(rank + 1)) for s in SHAPES]
    ddp = DDP(net) if hook else None
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    groups = leo_dist.leo_param_groups(net) if kind == "leo" else net.parameters()
    opt = cls(groups, bucket_mb=BUCKET_MB, grad_comm_warmup=0, **kw)
    if hook:
        leo_dist.hooks.attach(ddp, opt)
    bucket_bytes = max(4 * b.padded for b in opt.layout.buckets)
    out = []
    for step in range(3):
        opt.zero_grad()
        model = ddp if hook else net
        if hook:
            tracker = AllocationTracker()
            with tracker:
                model(grads).backward()
                opt.step()
        else:
            model(grads).backward()
            tracker = AllocationTracker()
            with tracker:
                opt.step()
        out.append((tracker.largest, tracker.peak))
    n = sum(b.numel for b in opt.layout.buckets)
    return {"steps": out, "bucket_bytes": bucket_bytes, "replicas": opt.verify_replicas(), "numel": n}


CASES = [("lion", {}, False), ("lion", {"grad_comm": "bf16"}, False), ("lion", {"grad_comm": "1bit"}, False),
         ("leo", {}, False), ("lion", {}, True), ("leo", {}, True)]


@pytest.mark.parametrize("kind,kw,hook", CASES, ids=["lion", "lion_bf16", "lion_1bit", "leo", "hook_lion", "hook_leo"])
def test_no_bucket_sized_allocation_after_first_step(kind, kw, hook):
    world = 2
    out = run_ranks(_measure, world, kind, kw, hook)
    # a block on the wire is CHUNK_ELEMS fp32 elements; a transient may be one such block (and
    # small per-bucket tables), never a bucket or a shard
    block = 4 * CHUNK_ELEMS
    for o in out:
        assert o["replicas"]
        assert o["bucket_bytes"] >= 4 * block
        for largest, peak in o["steps"][1:]:
            assert largest <= block, (largest, o["bucket_bytes"])
            # plus the packed update bits of every sign bucket (N/8 bytes, 1/32 of the fp32 parameters),
            # which the overlapped sign step keeps from its all-gathers until it applies them
            assert peak <= 2 * block + o["numel"] // 8, (peak, o["bucket_bytes"])
