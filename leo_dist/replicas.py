"""Replica bookkeeping of the sharded optimizers: every rank must hold the same model.

* :func:`check_same_layout` — at construction: ranks that disagree on the parameters (count,
  shapes, dtypes) or the group hyperparameters fail with ``ValueError`` on every rank instead of
  hanging in the first mismatched collective. One all-gather of 5 int64 per rank.
* :func:`broadcast_params` — at construction: rank 0's parameters to every rank, as DDP does.
* :func:`verify` — on demand: are all replicas bitwise equal? One all-gather of two int64
  checksums per parameter per rank.
"""
from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor

from .collectives import Comm
from .partition import Layout

__all__ = ["check_same_layout", "broadcast_params", "verify"]


def check_same_layout(comm: Comm, param_groups: list[dict[str, Any]], device: torch.device) -> None:
    """Raise ``ValueError`` on every rank when ranks disagree on the parameters or hyperparameters."""
    desc = []
    for g in param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        desc.append((sorted(hyper.items(), key=lambda kv: kv[0]),
                     [(tuple(p.shape), str(p.dtype)) for p in g["params"]]))
    params_crc = zlib.crc32(repr([d[1] for d in desc]).encode())
    hyper_crc = zlib.crc32(repr([d[0] for d in desc]).encode())
    n_params = sum(len(g["params"]) for g in param_groups)
    mine = torch.tensor([n_params, len(param_groups), params_crc, hyper_crc, comm.world],
                        dtype=torch.int64, device=device)
    if not comm.distributed:
        return
    table = torch.empty(comm.world * mine.numel(), dtype=torch.int64, device=device)
    comm.all_gather(table, mine)
    table = table.view(comm.world, -1).cpu()
    bad = [r for r in range(comm.world) if not torch.equal(table[r], table[0])]
    if bad:
        what = "parameter list (count, shapes or dtypes)" if any(
            table[r, :3].ne(table[0, :3]).any() for r in bad) else "param-group hyperparameters"
        raise ValueError(f"ranks disagree on the {what}: rank 0 has {table[0].tolist()[:2]} (params, groups), "
                         f"ranks {bad} differ; every rank must build the optimizer over the same model")


@torch.no_grad()
def broadcast_params(comm: Comm, layout: Layout) -> None:
    """Make every replica of the held parameters equal to rank 0's, bucket by bucket."""
    if not comm.distributed:
        return
    for b in layout.buckets:
        buf = torch.cat([s.param.detach().reshape(-1) for s in b.slots])
        comm.broadcast(buf, 0)
        for s in b.slots:
            s.param.copy_(buf[s.offset : s.offset + s.numel].view_as(s.param))


@torch.no_grad()
def verify(comm: Comm, params: list[Tensor], device: torch.device) -> bool:
    """True when every rank's ``params`` are bitwise equal to rank 0's (collective)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for p in params:
        x = p.detach().reshape(-1).view(ints[p.element_size()]).to(torch.int64)
        w = torch.arange(x.numel(), device=x.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([x.sum(), (x * w).sum()]))
    mine = torch.stack(sums).reshape(-1) if sums else torch.zeros(0, dtype=torch.int64, device=device)
    if not comm.distributed:
        return True
    table = torch.empty(comm.world * mine.numel(), dtype=torch.int64, device=device)
    comm.all_gather(table, mine)
    table = table.view(comm.world, -1)
    return bool((table == table[0]).all())
