"""World-size independent optimizer state for the sharded optimizers.

``state_dict()`` has the layout of the single-process :class:`~leo_dist.Leo`/:class:`~leo_dist.Lion`
— ``{"state": {i: {"exp_avg": tensor shaped like parameter i}}, "param_groups": [...]}`` with
parameters numbered across groups in order — so it loads into a sharded optimizer at any world
size, or into the single-process optimizer, and saves with ``torch.save`` or
``torch.distributed.checkpoint``. Gathering costs one all-gather of the momentum (N elements).

Lossy modes add what they carry between steps, also world-size independent:
``state[i]["update_error"]`` (``update_comm="1bit"``: the owner's error buffer, gathered) and
``state[i]["grad_error"]`` (``grad_comm="1bit"``: the mean over ranks of the per-rank gradient
error buffers — what the averaged gradient has not yet received — so that any number of ranks
can carry it on), plus ``state_dict["leo_dist"]["steps"]`` for the 1-bit warm-up.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["sharded_state_dict", "load_sharded_state_dict"]


def _gather(opt, bi: int, shard: Tensor) -> Tensor:
    b = opt._buckets[bi]
    full = torch.empty(opt._comm.world * b.shard, dtype=shard.dtype, device=shard.device)
    opt._comm.all_gather(full, shard)
    return full


@torch.no_grad()
def sharded_state_dict(opt) -> dict[str, Any]:
    """Collective: the full state of sharded optimizer ``opt`` on every rank (see module doc)."""
    world = opt._comm.world
    state: dict[int, dict[str, Tensor]] = {}
    for bi, b in enumerate(opt._buckets):
        fulls = {"exp_avg": _gather(opt, bi, opt._momentum[bi])}
        if bi in opt._update_error:
            fulls["update_error"] = _gather(opt, bi, opt._update_error[bi])
        if opt.grad_comm == "1bit":
            err = opt._grad_error.get(bi)
            err = torch.zeros(b.padded, dtype=torch.float32, device=opt._device) if err is None else err.clone()
            opt._comm.all_reduce(err)
            fulls["grad_error"] = err.div_(world)
        for s in b.slots:
            state[s.index] = {k: v[s.offset : s.offset + s.numel].clone().view_as(s.param) for k, v in fulls.items()}
    groups, index = [], 0
    for g in opt.param_groups:
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = list(range(index, index + len(g["params"])))
        index += len(g["params"])
        groups.append(d)
    return {"state": dict(sorted(state.items())), "param_groups": groups, "leo_dist": {"steps": opt._steps_done}}


@torch.no_grad()
def load_sharded_state_dict(opt, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` (from any world size, or the single-process optimizer) into ``opt``.

    Group hyperparameters are restored; each rank keeps only its shard of the momentum and of the
    update error; every rank takes the saved mean gradient error. Parameters without saved state
    keep zeros. Raises ``ValueError`` when the groups or parameter sizes do not match.
    """
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} param groups, "
                         f"this optimizer has {len(opt.param_groups)}")
    for mine, saved in zip(opt.param_groups, groups):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError("state_dict's param groups hold different numbers of parameters")
    saved_ids = [i for g in groups for i in g["params"]]
    state = state_dict.get("state", {})
    rank = opt._comm.rank
    for bi, b in enumerate(opt._buckets):
        lo, hi = b.shard_range(rank)
        for s in b.slots:
            entry = state.get(saved_ids[s.index]) or {}
            for key, value in entry.items():
                if not isinstance(value, Tensor) or key == "step":
                    continue
                if value.numel() != s.numel:
                    raise ValueError(f"saved {key} of parameter {s.index} has {value.numel()} elements, the "
                                     f"parameter has {s.numel}")
            a, e = s.owned(lo, hi)
            if "exp_avg" in entry:
                opt.state[s.param]["exp_avg"].copy_(entry["exp_avg"].reshape(-1)[a:e])
            if "update_error" in entry and "update_error" in opt.state[s.param]:
                opt.state[s.param]["update_error"].copy_(entry["update_error"].reshape(-1)[a:e])
            if "grad_error" in entry and opt.grad_comm == "1bit":
                err = opt._grad_error.get(bi)
                if err is None:
                    err = opt._grad_error[bi] = torch.zeros(b.padded, dtype=torch.float32, device=opt._device)
                err[s.offset : s.offset + s.numel].copy_(entry["grad_error"].reshape(-1))
    for mine, saved in zip(opt.param_groups, groups):
        for k, v in saved.items():
            if k != "params":
                mine[k] = v
    opt._steps_done = int(state_dict.get("leo_dist", {}).get("steps", opt._steps_done))
