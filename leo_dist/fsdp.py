"""Lion and Leo on DTensor parameters, as FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves them.

After ``fully_shard``, every parameter is a ``DTensor`` whose local tensor is this rank's slice of
the rows (placement ``Shard(0)``, ``torch.chunk`` semantics: ``ceil(R/W)`` rows per rank, so the
last ranks may hold fewer rows or none at all, e.g. a (4, C) matrix at W=3 is split 2/2/0). The
gradient FSDP2 leaves in ``p.grad`` is a DTensor of the same placement holding the averaged
gradient, and the momentum ``state["exp_avg"]`` is created by ``torch.zeros_like(p)``: a DTensor of
the same placement too, so ``optimizer.state_dict()`` holds DTensors exactly as
``torch.optim.AdamW`` does under FSDP2, and ``torch.distributed.checkpoint.state_dict``'s
``get_optimizer_state_dict``/``set_optimizer_state_dict`` work unchanged.

The step is :mod:`leo_dist.functional`'s maths on the local tensors:

- Lion, and Leo's sign rule: element-wise, so any placement is handled with no communication.
- Leo's 2-D rule: ``u = c/(‖rows‖+ε) + c/(‖cols‖+ε)`` needs whole-matrix norms. For a matrix
  sharded along tensor dim ``d`` (``Shard(d)``), the sums of squares along ``d`` are partial on
  each rank; they are completed with one all-reduce over the mesh dimension(s) that shard it, all
  matrices of the step in one buffer (dim 0 sharded: ``C`` floats per matrix; dim 1: ``R``).
  ``Σu²`` for the RMS scale is completed with a second all-reduce of one float per matrix. A
  ``Replicate`` mesh dimension (HSDP's outer dimension) needs nothing: each replica holds the same
  values. Every element meets the same complete norms whatever the split, so the result is the
  unsharded Leo's up to fp32 summation order.

Placements other than ``Shard(d)`` and ``Replicate`` (``_StridedShard`` from FSDP2+TP, ``Partial``)
and matrices sharded along both dims raise ``NotImplementedError`` naming the placement for Leo's
2-D rule; the sign rule accepts any placement shared by parameter, gradient and momentum.

FSDP2's own traffic (parameter all-gathers every forward, gradient reduce-scatter) is unchanged;
``docs/fsdp.md`` explains why 1-bit updates cannot shrink it without a full replica per rank, and
:class:`AllToAllReduceScatter` is a drop-in for ``set_custom_reduce_scatter`` that halves FSDP2's
gradient bytes on gloo.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import Backend
from .functional import apply_update_, interpolate, leo_scale, update_momentum_
from .collectives import Comm, CommStats, Done, sum_in_rank_order

__all__ = ["is_dtensor", "any_dtensor", "dtensor_step_", "comm_stats", "AllToAllReduceScatter"]

# Per-optimizer byte counts of the norm all-reduces: optim.py stays free of FSDP bookkeeping.
_STATS: "weakref.WeakKeyDictionary[Any, CommStats]" = weakref.WeakKeyDictionary()


def _dtensor_cls():
    # No DTensor can exist before torch.distributed.tensor is imported: plain training never pays for it.
    if not dist.is_available() or "torch.distributed.tensor" not in sys.modules:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without DTensor
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """True when ``t`` is a ``torch.distributed.tensor.DTensor`` (False where DTensor is unavailable)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def any_dtensor(param_groups: Sequence[dict[str, Any]]) -> bool:
    """True when some parameter of ``param_groups`` is a DTensor (then :func:`dtensor_step_` steps them all)."""
    return any(is_dtensor(p) for g in param_groups for p in g["params"])


def comm_stats(optimizer: Any) -> dict:
    """Bytes of ``optimizer``'s Leo norm all-reduces, in :meth:`leo_dist.ShardedLeo.comm_stats`'s format.

    Only the optimizer's own collectives are counted; FSDP2's all-gathers and reduce-scatters are not.
    """
    stats = _STATS.get(optimizer)
    return (stats or CommStats()).report()


def _local(t: Tensor) -> Tensor:
    # to_local() under no_grad aliases the DTensor's storage: in-place writes reach the parameter.
    return t.to_local() if is_dtensor(t) else t


def _same_layout(p: Tensor, other: Tensor, what: str) -> None:
    if not is_dtensor(other):
        if other.shape != p.to_local().shape:
            raise ValueError(f"{what} of a DTensor parameter must be a DTensor of the same placements "
                             f"or a tensor shaped like its local shard {tuple(p.to_local().shape)}, "
                             f"got shape {tuple(other.shape)}")
        return
    if other.device_mesh != p.device_mesh or tuple(other.placements) != tuple(p.placements):
        raise NotImplementedError(f"{what} has placements {tuple(other.placements)} on {other.device_mesh}, "
                                  f"its parameter {tuple(p.placements)} on {p.device_mesh}; "
                                  "leo_dist steps only matching layouts")


def _sharding_of(p: Tensor) -> tuple[int | None, tuple[int, ...]]:
    """(tensor dim that is sharded or None, mesh dims sharding it) for a 2-D DTensor parameter."""
    from torch.distributed.tensor import Replicate, Shard

    dim, mesh_dims = None, []
    for md, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if type(pl) is Shard and pl.dim in (0, 1, -1, -2):
            d = pl.dim % 2
            if dim is not None and d != dim:
                raise NotImplementedError(
                    f"Leo's 2-D rule on a matrix sharded along both dims (placements {tuple(p.placements)}) "
                    "is not implemented; use placements that shard one dim")
            dim = d
            mesh_dims.append(md)
            continue
        raise NotImplementedError(
            f"Leo's 2-D rule on a DTensor with placement {pl!r} (placements {tuple(p.placements)}) is not "
            "implemented: only Shard(0), Shard(1) and Replicate are; put this parameter in a group with "
            "orthogonalize=False to give it the sign rule")
    return dim, tuple(mesh_dims)


class _Reducer:
    """One sum all-reduce per (mesh, mesh dims) key, over each mesh dim's process group in turn."""

    def __init__(self, stats: CommStats):
        self.stats = stats
        self._comms: dict[tuple[Any, int], Comm] = {}

    def _comm(self, mesh, md: int) -> Comm:
        key = (mesh, md)
        comm = self._comms.get(key)
        if comm is None:
            comm = Comm(mesh.get_group(md))
            comm.stats = self.stats
            self._comms[key] = comm
        return comm

    def all_reduce(self, mesh, mesh_dims: tuple[int, ...], buf: Tensor) -> None:
        # Sum over a product of mesh dims = successive sums over each dim's group.
        for md in mesh_dims:
            self._comm(mesh, md).all_reduce(buf)


def _matrix_step(matrices: list[tuple[dict, Tensor, Tensor, Tensor]], reducer: _Reducer) -> None:
    """Leo's 2-D rule for (group, param, grad, exp_avg) DTensor matrices; params/momenta in place.

    Sends, per (mesh, sharding mesh dims) key: one fp32 all-reduce of Σ over its matrices of the
    length of the unsharded dim (the partial sums of squares), and one of one float per matrix (Σu²).
    """
    entries = []  # (group, p_local, g_local, m_local, c, dim, key, numel)
    for group, p, g, m in matrices:
        dim, mesh_dims = _sharding_of(p)
        key = (p.device_mesh, mesh_dims) if mesh_dims else None
        pl, gl, ml = _local(p), _local(g), _local(m)
        beta1, beta2 = group["betas"]
        c = interpolate(ml, gl, beta1)
        update_momentum_(ml, gl, beta2)
        entries.append((group, pl, c, dim, key, p.numel()))

    # Complete sums of squares. Sums along the sharded dim are partial; along the other, local.
    row_sq = [c.square().sum(dim=1, keepdim=True) for _, _, c, *_ in entries]   # (r_local, 1)
    col_sq = [c.square().sum(dim=0, keepdim=True) for _, _, c, *_ in entries]   # (1, C_local)
    by_key: dict[Any, list[int]] = {}
    for i, e in enumerate(entries):
        if e[4] is not None:
            by_key.setdefault(e[4], []).append(i)
    for (mesh, mesh_dims), idx in by_key.items():
        partial = [col_sq[i] if entries[i][3] == 0 else row_sq[i] for i in idx]
        buf = torch.cat([t.reshape(-1) for t in partial]) if partial else None
        reducer.all_reduce(mesh, mesh_dims, buf)
        pos = 0
        for i, t in zip(idx, partial):
            done = buf[pos: pos + t.numel()].view_as(t)
            pos += t.numel()
            if entries[i][3] == 0:
                col_sq[i] = done
            else:
                row_sq[i] = done

    usq = []
    for i, (group, pl, c, dim, key, numel) in enumerate(entries):
        eps = group["eps"]
        c.copy_(c / (row_sq[i].sqrt() + eps) + c / (col_sq[i].sqrt() + eps))  # c now holds u
        usq.append(c.square().sum())
    for (mesh, mesh_dims), idx in by_key.items():
        buf = torch.stack([usq[i] for i in idx])
        reducer.all_reduce(mesh, mesh_dims, buf)
        for j, i in enumerate(idx):
            usq[i] = buf[j]

    for i, (group, pl, u, dim, key, numel) in enumerate(entries):
        s = leo_scale(usq[i], numel, group["align_const"], group["eps"])
        apply_update_(pl, u.mul_(s), group["lr"], group["weight_decay"])


@torch.no_grad()
def dtensor_step_(optimizer: Any, work: Sequence[tuple[dict, list, list, list]], *, rule: str,
                  backend: Backend | None = None) -> None:
    """One Lion (``rule="lion"``) or Leo (``rule="leo"``) step over DTensor parameters, in place.

    ``work`` holds, per param group, ``(group, params, grads, exp_avgs)`` as the optimizer gathered
    them (parameters with a gradient; momentum already created). Every parameter must be a DTensor;
    its grad and momentum DTensors of the same mesh and placements (or the momentum a plain tensor
    shaped like the local shard). Any dtype the functional maths accepts; computed in fp32.

    Element-wise parts run on the local shards through ``backend`` (the optimizer's, see :mod:`leo_dist.dispatch`). Leo's 2-D
    matrices of all groups share two all-reduces per sharding key (see :func:`_matrix_step`);
    their byte counts are in :func:`comm_stats`. Sends nothing when no matrix is sharded.
    """
    if rule not in ("lion", "leo"):
        raise ValueError(f"rule must be 'lion' or 'leo', got {rule!r}")
    stats = _STATS.get(optimizer)
    if stats is None:
        stats = _STATS[optimizer] = CommStats()
    matrices = []
    for group, params, grads, exp_avgs in work:
        plain = [p for p in group["params"] if not is_dtensor(p)]
        if plain:
            raise TypeError(f"a param group mixes DTensor and plain parameters (first plain one: shape "
                            f"{tuple(plain[0].shape)}); put FSDP2-sharded and other parameters in separate "
                            "optimizers")
        for p, g, m in zip(params, grads, exp_avgs):
            _same_layout(p, g, "grad")
            _same_layout(p, m, "exp_avg")
        ortho = rule == "leo" and group.get("orthogonalize", True)
        sign = [i for i, p in enumerate(params) if not (ortho and p.ndim == 2)]
        matrices += [(group, params[i], grads[i], exp_avgs[i]) for i, p in enumerate(params) if ortho and p.ndim == 2]
        if not sign:
            continue
        beta1, beta2 = group["betas"]
        kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                  sign_scale=group["align_const"] if rule == "leo" else 1.0)
        ps = [_local(params[i]) for i in sign]
        gs = [_local(grads[i]) for i in sign]
        ms = [_local(exp_avgs[i]) for i in sign]
        (backend or Backend()).lion_step(ps, gs, ms, **kw)
    if matrices:
        _matrix_step(matrices, _Reducer(stats))
    stats.end_step()


def _fsdp_reduce_scatter_base() -> type:
    # FSDP2's ABC lives in a private module; without it (older torch) the class still imports.
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError:  # pragma: no cover
        return object
    return ReduceScatter


def __getattr__(name: str):
    # Built on first use: importing FSDP2 costs ~0.5 s, which optim.py's plain path must not pay.
    if name == "AllToAllReduceScatter":
        cls = type("AllToAllReduceScatter", (_AllToAllReduceScatter, _fsdp_reduce_scatter_base()),
                   {"__doc__": _AllToAllReduceScatter.__doc__, "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AllToAllReduceScatter:
    """A reduce-scatter for FSDP2's ``module.set_custom_reduce_scatter`` built from ``all_to_all_single``.

    Gloo's ``reduce_scatter`` moves as many bytes as an all-reduce (docs/design.md, phase 1); this moves
    ``(W−1)/W`` of the input per rank, the ideal. Rank r receives the W chunks r of every rank
    (``input`` is ``W·S`` elements, ``output`` ``S``), sums them in rank order in the wire dtype's
    float32 widening, and divides by W for ``AVG``: the same bits as ``sum(g_r)/W`` in rank order,
    so it is also deterministic. Supports ``SUM`` and ``AVG``; other ops raise ``NotImplementedError``.
    Synchronous (it returns a finished work handle). Holds a scratch buffer of the input's size
    during the call. Use it on gloo; on NCCL FSDP2's default ``reduce_scatter`` is already optimal.
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False):
        w = dist.get_world_size(group)
        if op == dist.ReduceOp.SUM:
            divide = False
        elif op == dist.ReduceOp.AVG:
            divide = True
        else:
            raise NotImplementedError(f"AllToAllReduceScatter supports ReduceOp.SUM and AVG, got {op!r} "
                                      "(FSDP2 picks PREMUL_SUM when gradient_divide_factor is set)")
        recv = torch.empty_like(input_tensor)
        dist.all_to_all_single(recv, input_tensor.contiguous(), group=group)
        total = sum_in_rank_order(recv.view(w, -1))
        if divide:
            total.div_(w)
        output_tensor.copy_(total.view_as(output_tensor))
        return Done()
