"""Checkpoints of the sharded optimizers: sharded through DCP, or consolidated onto one rank.

Three ways in and out, none of which ever gathers the whole state onto every rank:

* **Sharded, through** ``torch.distributed.checkpoint`` **(the default for training jobs).**
  :meth:`~leo_dist.ShardedLion.sharded_state_dict` returns, with no communication in the exact
  modes, a dict whose tensors are ``ShardedTensor``\\ s over the rank's own shard: every rank
  calls ``dcp.save({"optim": opt.sharded_state_dict(), ...}, checkpoint_id=...)`` and writes only
  what it owns. To resume, at any world size: ``sd = {"optim": opt.sharded_state_dict()}``,
  ``dcp.load(sd, checkpoint_id=...)``, ``opt.load_sharded_state_dict(sd["optim"])``. DCP reads
  into the optimizer's own buffers only the ranges this rank now owns.
* **Consolidated onto one rank**, for export and for the single-process ``Leo``/``Lion``:
  ``opt.consolidate_state_dict(to=0)`` on every rank (collective: one ``gather`` per bucket), then
  ``opt.state_dict()`` on rank 0 returns the full state; the other ranks hold at most one bucket
  at a time while it runs.
* ``opt.state_dict()`` without that call, in a world of more than one rank, raises a
  ``RuntimeError`` at once saying what to call: it never blocks waiting for ranks that are not
  calling it (the ``if rank == 0: torch.save(opt.state_dict())`` pattern), and never returns a
  partial state.

Format. The full state has the single-process layout: ``{"state": {i: {"exp_avg": tensor shaped
like parameter i}}, "param_groups": [...], "leo_dist": {...}}``, parameters numbered across groups
in order; a parameter of an ``"adamw"`` group has ``torch.optim.AdamW``'s entries ``step`` (0-d
float32, the same on every rank; a plain tensor in the sharded form) and ``exp_avg``, ``exp_avg_sq``
(sharded like the momentum). The sharded form stores each parameter's state flattened
(``[numel]``), rank ``r`` holding the flat range it owns. Both carry ``state_dict["leo_dist"]``: the format, the optimizer's
class and modes, and the step count (the 1-bit warm-up). Lossy modes add what they carry between
steps, world-size independent: ``update_error`` (``update_comm="1bit"``: the owner's error
buffer, sharded like the momentum) and ``grad_error`` (``grad_comm="1bit"``: the mean over ranks
of the per-rank error buffers — what the averaged gradient has not yet received — so that any
number of ranks can carry it on; saving it costs one all-reduce per bucket, loading one
all-gather per bucket, because every rank keeps a full-size buffer).
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .adamw import algorithm_of
from .validation import check_state_dict

__all__ = ["FORMAT", "full_state_dict", "consolidate", "sharded_state_dict", "load_state_dict",
           "load_sharded_state_dict"]

FORMAT = "leo_dist/1"


@contextmanager
def _sharded_tensor_api():
    # DCP reshards ShardedTensor (arbitrary 1-D ranges per rank); DTensor only shards evenly, and
    # our shard boundaries fall anywhere. torch marks ShardedTensor for deprecation with a
    # FutureWarning on every use; it stays silenced inside these calls only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        yield


def _meta(opt) -> dict[str, Any]:
    return {"format": FORMAT, "optimizer": type(opt).__name__, "grad_comm": opt.grad_comm,
            "update_comm": opt.update_comm, "steps": opt._steps_done}


def _groups(opt) -> list[dict[str, Any]]:
    groups, index = [], 0
    for g in opt.param_groups:
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = list(range(index, index + len(g["params"])))
        index += len(g["params"])
        groups.append(d)
    return groups


def _mean_grad_error(opt, bi: int) -> Tensor:
    """Every rank's full-bucket mean of the 1-bit gradient error buffers (one all-reduce)."""
    err = opt._exchange.grad_error[bi].clone()
    opt._comm.all_reduce(err)
    return err.div_(opt._comm.world)


def _bucket_states(opt, bi: int) -> dict[str, Tensor]:
    """This rank's shard of each state kind of bucket ``bi`` (``bucket.shard`` elements)."""
    states = {"exp_avg": opt._momentum[bi]}
    if bi in opt._matrices.update_error:
        states["update_error"] = opt._matrices.update_error[bi]
    if bi in opt._adamw.exp_avg_sq:
        states["exp_avg_sq"] = opt._adamw.exp_avg_sq[bi]
    return states


def _full_entries(opt, b, fulls: dict[str, Tensor], state: dict[int, dict[str, Tensor]]) -> None:
    """``state[i]`` for each parameter of bucket ``b`` from the bucket-sized tensors ``fulls``:
    views shaped like the parameter, plus a copy of its ``step`` for AdamW groups (as
    ``torch.optim.AdamW`` keeps it: a 0-d float32 tensor; every rank holds every count)."""
    for s in b.slots:
        state[s.index] = {k: v[s.offset : s.offset + s.numel].view_as(s.param) for k, v in fulls.items()}
        if "step" in opt.state[s.param]:
            state[s.index]["step"] = opt.state[s.param]["step"].clone()


# ----------------------------------------------------------------------------- full (one rank)
@torch.no_grad()
def full_state_dict(opt) -> dict[str, Any]:
    """The full state of a one-rank optimizer (no communication)."""
    state: dict[int, dict[str, Tensor]] = {}
    for bi, b in enumerate(opt._layout.buckets):
        fulls = {k: v.clone() for k, v in _bucket_states(opt, bi).items()}
        if opt.grad_comm == "1bit":
            fulls["grad_error"] = _mean_grad_error(opt, bi)
        _full_entries(opt, b, fulls, state)
    return {"state": dict(sorted(state.items())), "param_groups": _groups(opt), "leo_dist": _meta(opt)}


@torch.no_grad()
def consolidate(opt, to: int) -> dict[str, Any] | None:
    """Collective: gather the full state onto group rank ``to``; returns it there, None elsewhere.

    Per bucket one ``gather`` of each state kind's shard (and, with 1-bit gradients, one
    all-reduce of the error buffers), so ranks other than ``to`` hold at most one bucket's
    buffers at a time. Sends ``S·itemsize`` bytes per rank, bucket and state kind.
    """
    comm, world = opt._comm, opt._comm.world
    if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < world:
        raise ValueError(f"to must be a rank of the optimizer's group (0..{world - 1}), got {to!r}")
    if not comm.distributed:
        return full_state_dict(opt)
    mine = comm.rank == to
    state: dict[int, dict[str, Tensor]] = {}
    for bi, b in enumerate(opt._layout.buckets):
        fulls = {}
        for key, shard in _bucket_states(opt, bi).items():
            out = torch.empty(world * b.shard, dtype=shard.dtype, device=shard.device) if mine else None
            comm.gather(out, shard, to)
            fulls[key] = out
        if opt.grad_comm == "1bit":
            # an all-reduce, not a reduce: the same bits as the mean a DCP save writes
            fulls["grad_error"] = _mean_grad_error(opt, bi)
        if mine:
            _full_entries(opt, b, fulls, state)
    if not mine:
        return None
    return {"state": dict(sorted(state.items())), "param_groups": _groups(opt), "leo_dist": _meta(opt)}


# ----------------------------------------------------------------------------- sharded (DCP)
def _sharded(local: Tensor, numel: int, ranges: list[tuple[int, int]], rank: int, group) -> Any:
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    device = str(local.device) if local.device.type != "cuda" else f"cuda:{local.device.index or 0}"
    shards = [ShardMetadata([a], [e - a], f"rank:{r}/{device}") for r, (a, e) in enumerate(ranges) if e > a]
    md = ShardedTensorMetadata(shards, torch.Size([numel]), TensorProperties(dtype=local.dtype))
    a, e = ranges[rank]
    own = [Shard(local, ShardMetadata([a], [e - a], f"rank:{rank}/{device}"))] if e > a else []
    with _sharded_tensor_api():
        return ShardedTensor._init_from_local_shards_and_global_metadata(own, md, process_group=group)


def _shard_states(opt, bi: int) -> dict[str, Tensor]:
    """``_bucket_states`` plus, with 1-bit gradients, the grad error to save: the live buffer in
    a world of one, else this rank's slice of the mean over ranks (one all-reduce)."""
    states = dict(_bucket_states(opt, bi))
    if opt.grad_comm == "1bit":
        if opt._comm.world == 1:
            states["grad_error"] = opt._exchange.grad_error[bi][: opt._layout.buckets[bi].shard]
        else:
            lo, hi = opt._layout.buckets[bi].shard_range(opt._comm.rank)
            states["grad_error"] = _mean_grad_error(opt, bi)[lo:hi].clone()
    return states


@torch.no_grad()
def sharded_state_dict(opt) -> dict[str, Any]:
    """This rank's part of the state, for ``torch.distributed.checkpoint`` (see the module doc).

    Each parameter's ``exp_avg`` (and ``update_error``) is a 1-D ``ShardedTensor`` of ``numel``
    elements whose local shard is a *view of the optimizer's own buffer*: ``dcp.save`` reads it in
    place and ``dcp.load`` writes into it in place. No communication, except with
    ``grad_comm="1bit"`` (one all-reduce per bucket for the mean error; this rank keeps its owned
    slice of it). In a world of one the tensors are plain flat views of the live buffers.
    """
    comm, world, rank = opt._comm, opt._comm.world, opt._comm.rank
    state: dict[int, dict[str, Any]] = {}
    for bi, b in enumerate(opt._layout.buckets):
        for key, shard in _shard_states(opt, bi).items():
            for s, _, view in opt._layout.shard_views(bi, shard):
                if world == 1:
                    value = view
                else:
                    ranges = [s.owned(*b.shard_range(r)) for r in range(world)]
                    value = _sharded(view, s.numel, ranges, rank, comm.group)
                state.setdefault(s.index, {})[key] = value
        for s in b.slots:
            if "step" in opt.state[s.param]:  # replicated on every rank: a plain tensor for DCP, loaded in place
                state[s.index]["step"] = opt.state[s.param]["step"]
    # One JSON string for everything that is not a tensor: DCP flattens nested non-tensor
    # containers differently at save and at load across its format versions; a string is a leaf.
    meta = dict(_meta(opt), param_groups=[{k: _jsonable(v) for k, v in g.items()} for g in _groups(opt)])
    return {"state": dict(sorted(state.items())), "leo_dist": json.dumps(meta)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def _check_meta(opt, saved: Any, where: str) -> None:
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{where} is not a leo_dist checkpoint of format {FORMAT!r} (its 'leo_dist' entry is "
                         f"{saved!r}); a full single-process state loads with load_state_dict")
    if saved.get("optimizer") != type(opt).__name__:
        raise ValueError(f"{where} holds the state of a {saved.get('optimizer')}, this optimizer is a "
                         f"{type(opt).__name__}")


def _check_groups(opt, groups: Any) -> list[int]:
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} param groups, "
                         f"this optimizer has {len(opt.param_groups)}")
    for mine, saved in zip(opt.param_groups, groups):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError("state_dict's param groups hold different numbers of parameters")
    _check_algorithms(opt, groups)
    return [i for g in groups for i in g["params"]]


def _check_algorithms(opt, groups: Any) -> None:
    """``ValueError`` when a saved group follows another rule ("adamw", "leo", ...) than this
    optimizer's group at its position: its state would land in the wrong kind of bucket."""
    if not isinstance(groups, list):
        return
    for gi, (mine, saved) in enumerate(zip(opt.param_groups, groups)):
        theirs = algorithm_of(saved, opt._algorithm) if isinstance(saved, dict) else None
        if theirs is not None and theirs != algorithm_of(mine, opt._algorithm):
            raise ValueError(f"state_dict's param_groups[{gi}] has algorithm {theirs!r}, this optimizer's has "
                             f"{algorithm_of(mine, opt._algorithm)!r}")


def _restore_groups_and_steps(opt, groups: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    for mine, saved in zip(opt.param_groups, groups):
        for k, v in saved.items():
            if k != "params":
                mine[k] = v
    opt._steps_done = int(meta.get("steps", opt._steps_done))


@torch.no_grad()
def load_sharded_state_dict(opt, sd: dict[str, Any]) -> None:
    """Finish a DCP load into ``opt`` (collective with ``grad_comm="1bit"``).

    ``sd`` is the dict :func:`sharded_state_dict` returned, after ``dcp.load`` filled it: the
    momentum and update errors are already in place; this restores the group hyperparameters
    and the step count, and with 1-bit gradients all-gathers the mean error into every rank's
    full-size buffer (one all-gather per bucket).
    """
    raw = sd.get("leo_dist")
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        meta = None
    _check_meta(opt, meta, "the loaded state")
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta.get("param_groups", [])]
    _check_groups(opt, groups)
    if opt.grad_comm == "1bit" and opt._comm.world > 1:
        for bi, b in enumerate(opt._layout.buckets):
            mine = torch.zeros(b.shard, dtype=torch.float32, device=opt._device)
            for s, _, view in opt._layout.shard_views(bi, mine):
                entry = sd["state"].get(s.index, {}).get("grad_error")
                shards = entry.local_shards() if entry is not None else []
                if shards:
                    view.copy_(shards[0].tensor)
            mean = torch.empty_like(opt._exchange.grad_error[bi])
            opt._comm.all_gather(mean, mine)
            opt._exchange.set_mean_error(bi, mean)
    _restore_groups_and_steps(opt, groups, meta)


@torch.no_grad()
def load_state_dict(opt, state_dict: dict[str, Any]) -> None:
    """Load a full state (:func:`consolidate`, a one-rank ``state_dict()``, or the single-process
    ``Leo``/``Lion``) into ``opt`` at any world size; no communication.

    Each rank keeps only its shard of the momentum and of the update error; every rank takes the
    saved mean gradient error. Parameters without saved state keep zeros. Raises ``ValueError``
    when the groups or parameter shapes do not match, when it is another optimizer's or the sharded
    (DCP) form, or when a saved hyperparameter is invalid, before anything is modified
    (:func:`leo_dist.validation.check_state_dict`).
    """
    if isinstance(state_dict, dict) and isinstance(state_dict.get("leo_dist"), dict):
        _check_meta(opt, state_dict["leo_dist"], "state_dict")  # first: it names the optimizer that saved it
    if isinstance(state_dict, dict):
        _check_algorithms(opt, state_dict.get("param_groups"))  # before the key checks, which blame "another optimizer"
    check_state_dict(state_dict, opt.param_groups, type(opt).__name__)
    saved_ids = _check_groups(opt, state_dict.get("param_groups"))
    state = state_dict.get("state", {})
    entries = []
    for bi, b in enumerate(opt._layout.buckets):
        for s in b.slots:
            entries.append((bi, s, state.get(saved_ids[s.index]) or {}))
    rank = opt._comm.rank
    means = {bi: torch.zeros_like(e) for bi, e in opt._exchange.grad_error.items()} if opt.grad_comm == "1bit" else {}
    for bi, s, entry in entries:
        b = opt._layout.buckets[bi]
        a, e = s.owned(*b.shard_range(rank))
        mine = opt.state[s.param]
        for key in ("exp_avg", "update_error", "exp_avg_sq"):
            if key in entry and key in mine:
                mine[key].copy_(entry[key].reshape(-1)[a:e])
        if "step" in entry and "step" in mine:
            mine["step"].copy_(torch.as_tensor(entry["step"], dtype=torch.float32).reshape(()))
        if "grad_error" in entry and opt.grad_comm == "1bit":
            means[bi][s.offset : s.offset + s.numel].copy_(entry["grad_error"].reshape(-1))
    for bi, mean in means.items():
        opt._exchange.set_mean_error(bi, mean)
    _restore_groups_and_steps(opt, state_dict["param_groups"], state_dict.get("leo_dist", {}))
