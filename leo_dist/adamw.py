"""Phases 2–3 of a sharded step for param groups with ``"algorithm": "adamw"``.

One sharded optimizer can train a whole model: Leo (or Lion) on the matrices, AdamW on
embeddings, norms and biases. An AdamW group's buckets (kind ``"adamw"``) go through the same
gradient exchange as every other bucket (any ``grad_comm``); then the owner of each shard takes
``torch.optim.AdamW``'s step on it (:func:`leo_dist.functional.adamw_update_`: decoupled decay,
bias correction, a step count per parameter) and the new parameter values are all-gathered at
full width in the parameter dtype (``S·itemsize`` bytes in per rank and bucket,
:class:`~leo_dist.exact_gather.ExactGather`). Every rank copies the same gathered bytes into its
replica, so replicas stay bitwise identical. ``update_comm="1bit"`` does not apply: an AdamW
update is not a sign, and its values always travel exact. bfloat16 parameters of AdamW groups
round to nearest (``bf16_rounding`` applies to the Lion/Leo updates).

State per AdamW bucket, on its owner: ``exp_avg`` (the optimizer's momentum shard, in
``momentum_dtype``), ``exp_avg_sq`` (a float32 shard, :attr:`AdamWStep.exp_avg_sq`); on every
rank: one float32 step count per parameter (:attr:`AdamWStep.steps`, on the CPU, as torch keeps
``state["step"]``), which advances only in steps where some rank had a gradient for it.

Group defaults (:func:`resolve_algorithm`): a group that does not set ``"algorithm"`` takes the
optimizer's own rule ("lion" for ShardedLion, "leo" for ShardedLeo). An ``"adamw"`` group takes the
optimizer's ``lr`` unless it sets one (as every torch.optim group does), but never its Lion/Leo
``betas``, ``eps`` or ``weight_decay``, which mean something else there: unset, they are
``torch.optim.AdamW``'s defaults, :data:`ADAMW_DEFAULTS`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .collectives import Comm
from .exact_gather import ExactGather
from .functional import adamw_update_
from .matrix import BLOCK_ELEMS
from .partition import Layout
from .signs import apply_to

__all__ = ["AdamWStep", "ADAMW_DEFAULTS", "resolve_algorithm", "algorithm_of"]

#: what an ``"adamw"`` group takes for each of these keys it does not set (torch.optim.AdamW's defaults)
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

# torch.optim.AdamW options this step does not implement: refused, never ignored
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


def algorithm_of(group: dict[str, Any], own: str) -> str:
    """The rule a param group follows: its ``"algorithm"``, else the optimizer's own (``own``)."""
    return group.get("algorithm", own)


def resolve_algorithm(group: dict[str, Any], own: str, index: int) -> None:
    """Validate ``group["algorithm"]`` (``index``: the group's position, for messages) and, for an
    ``"adamw"`` group, fill the AdamW defaults it does not set, in place and before torch.optim
    fills the optimizer's own. ``ValueError`` naming ``algorithm`` for another value."""
    algo = algorithm_of(group, own)
    if algo not in (own, "adamw"):
        raise ValueError(f"param_groups[{index}]['algorithm'] must be {own!r} or 'adamw', got {algo!r}")
    if algo != "adamw":
        return
    for key in _UNSUPPORTED:
        if group.get(key):
            raise NotImplementedError(f"param_groups[{index}]: {key}=True is not supported for 'adamw' groups")
    for key, value in ADAMW_DEFAULTS.items():
        group.setdefault(key, value)


class AdamWStep:
    """AdamW on every ``"adamw"`` bucket of a :class:`~leo_dist.partition.Layout`.

    Args:
        layout, comm: the optimizer's layout and collectives.
        device: where the ``exp_avg_sq`` shards live.

    Attributes:
        exp_avg_sq: ``bucket index -> float32 [S]``, this rank's shard of the second moments.
        steps: ``bucket index -> float32 [len(bucket.slots)]`` (CPU), each parameter's step count.
    """

    def __init__(self, layout: Layout, comm: Comm, device: torch.device):
        self.layout, self.comm = layout, comm
        self.buckets = layout.kind_buckets("adamw")
        self.exp_avg_sq = {bi: torch.zeros(layout.buckets[bi].shard, dtype=torch.float32, device=device)
                           for bi in self.buckets}
        self.steps = {bi: torch.zeros(len(layout.buckets[bi].slots), dtype=torch.float32) for bi in self.buckets}
        self._gather = ExactGather(comm, device, max((layout.buckets[bi].shard for bi in self.buckets), default=0),
                                   BLOCK_ELEMS)

    def step(self, groups: list[dict[str, Any]], shards: list[Tensor], exp_avgs: list[Tensor]) -> None:
        """Step every AdamW bucket. ``shards``/``exp_avgs`` are indexed by bucket: the averaged
        float32 gradient shards (consumed: overwritten with the new parameter values) and the
        momentum shards (updated in place). Every parameter's step count advances; the caller
        restores those of parameters no rank had a gradient for. One all-gather per bucket."""
        rank = self.comm.rank
        for bi in self.buckets:
            b, group = self.layout.buckets[bi], groups[self.layout.buckets[bi].group_index]
            beta1, beta2 = group["betas"]
            self.steps[bi] += 1
            counts = self.steps[bi].tolist()
            u, m, v = shards[bi], exp_avgs[bi], self.exp_avg_sq[bi]
            views = zip(self.layout.shard_views(bi, u), self.layout.shard_views(bi, m),
                        self.layout.shard_views(bi, v))
            for k, ((s, (a, e), g), (_, _, mk), (_, _, vk)) in enumerate(views):
                p = s.param.detach().reshape(-1)[a:e]  # a copy only for a non-contiguous parameter
                for i in range(0, e - a, BLOCK_ELEMS):  # element-wise: blocks only bound the temporaries
                    j = i + BLOCK_ELEMS
                    adamw_update_(p[i:j], g[i:j], mk[i:j], vk[i:j], step=counts[k], lr=group["lr"], beta1=beta1,
                                  beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], out=g[i:j])
            u[b.valid_in_shard(rank):] = 0  # the padding travels too: send zeros, not stale gradient
            self._gather.send(b, u, _copy_into, f"bucket {bi}")


def _copy_into(s, lo: int, hi: int, values: Tensor) -> None:
    apply_to(s.param, lambda p: p.view(-1)[lo:hi].copy_(values))
