"""The collectives a sharded step uses, with byte accounting.

``Comm`` wraps a process group (or a world of one with no group at all) and counts, per collective
kind, the bytes of the tensors that went in and out and the bytes this rank puts on / takes off
the wire under the ideal algorithm (ring all-gather and all-reduce, direct all-to-all):

================  ===================  ===================
kind              sent per rank         received per rank
================  ===================  ===================
reduce_scatter    (W−1)/W · input       (W−1)/W · input
all_gather        (W−1) · input         (W−1) · input
all_reduce        2(W−1)/W · input      2(W−1)/W · input
broadcast         input (root), else 0  input (non-root)
all_to_all        (W−1)/W · input       (W−1)/W · input
gather            input (non-root)      (W−1)·input (root)
================  ===================  ===================

The reduce-scatter has two implementations (:attr:`Comm.native_reduce_scatter`):

* ``all_to_all_single`` followed by a local float32 sum of the W received chunks in rank order:
  the default on gloo, whose own ``reduce_scatter_tensor`` moves as many bytes as an all-reduce
  (docs/design.md, phase 1), and on NCCL for 16-bit wire dtypes, so that bf16 gradients are
  summed in float32 (one rounding, at the sender) instead of in bf16 (W−1 roundings), and the
  same bits come out on every backend;
* ``reduce_scatter_tensor``: the default on NCCL for float32 gradients (bandwidth-optimal
  there). Tests force it on gloo, which implements it, to exercise the NCCL branch on CPU.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import resolve_group

__all__ = ["CollectiveError", "Comm", "CommStats", "Done", "average_gradients", "naming", "sum_in_rank_order"]

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); older releases lack the new one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Count:
    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sent: int = 0
    received: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(calls=self.calls, bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                    sent=self.sent, received=self.received)


class CommStats:
    """Per-kind byte counts for the step in progress, the last finished step, and the total."""

    def __init__(self) -> None:
        self.current: dict[str, _Count] = defaultdict(_Count)
        self.last: dict[str, _Count] = {}
        self.total: dict[str, _Count] = defaultdict(_Count)
        self.steps = 0
        self._lock = threading.Lock()  # the background sender books from its own thread

    def add(self, kind: str, bytes_in: int, bytes_out: int, sent: int, received: int) -> None:
        with self._lock:
            for table in (self.current, self.total):
                c = table[kind]
                c.calls += 1
                c.bytes_in += bytes_in
                c.bytes_out += bytes_out
                c.sent += sent
                c.received += received

    @contextmanager
    def outside_step(self):
        """Book the collectives inside the block in the total only, not in the step in progress
        (construction, checkpoints, replica checks are not part of a training step)."""
        saved = self.current
        self.current = defaultdict(_Count)
        try:
            yield
        finally:
            self.current = saved

    def end_step(self) -> None:
        self.last = dict(self.current)
        self.current = defaultdict(_Count)
        self.steps += 1

    def report(self) -> dict:
        def table(t):
            d = {k: v.as_dict() for k, v in t.items()}
            d["sum"] = {f: sum(v[f] for v in d.values()) for f in ("calls", "bytes_in", "bytes_out", "sent", "received")}
            return d
        return {"last_step": table(self.last), "total": table(self.total), "steps": self.steps}


class CollectiveError(RuntimeError):
    """A collective failed (a peer exited or stalled); ``where`` says what it was moving, since
    gloo's and NCCL's own text name neither the phase nor the bucket. The original is the cause."""

    def __init__(self, where: str, cause: BaseException):
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.where, self.cause = where, cause


@contextmanager
def naming(what: str):
    """Re-raise a collective's ``RuntimeError`` inside as a :class:`CollectiveError` naming ``what``."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        raise CollectiveError(what, e) from e


class Done:
    """A finished 'work' handle (``wait()`` returns at once), for worlds of one and synchronous ops."""

    def wait(self, *args) -> bool:
        return True


def sum_in_rank_order(chunks: Tensor, out: Tensor | None = None) -> Tensor:
    """Sum ``chunks`` (``[W, S]``, any float dtype) over its first dimension into a float32
    ``[S]`` tensor, adding rank 0, then 1, ... in float32: every rank that sums the same chunks
    gets the same bits, whatever the collective's own reduction order would have been.

    ``out`` (float32 ``[S]``, not overlapping ``chunks``), if given, receives the sum and is
    returned; otherwise a new tensor is. Either way the bits are the same."""
    if out is None:
        total = chunks[0].float() if chunks.dtype != torch.float32 else chunks[0].clone()
    else:
        total = out.copy_(chunks[0])
    for i in range(1, chunks.shape[0]):
        total.add_(chunks[i])
    return total


class Comm:
    """Collectives over ``group`` (``None`` with no initialised default group: a world of 1)."""

    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats | None = None, label: str = "",
                 solo: bool = False) -> None:
        self.stats = stats if stats is not None else CommStats()
        #: appended to every kind this Comm books ("all_gather:inter"): the levels of a
        #: topology-aware exchange (leo_dist.topology) book apart in one CommStats
        self.label = label
        if group is None and not solo and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.group = group
        if group is None:
            self.world, self.rank, self.backend = 1, 0, "none"
        else:
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            self.backend = str(dist.get_backend(group)).lower()
        #: use ``reduce_scatter_tensor`` for float32 gradients (NCCL's default; see module doc).
        #: ``LEO_DIST_REDUCE_SCATTER=native`` or ``=all_to_all`` overrides it (tests run NCCL's branch on gloo).
        choice = os.environ.get("LEO_DIST_REDUCE_SCATTER", "")
        if choice not in ("", "native", "all_to_all"):
            raise ValueError(f"LEO_DIST_REDUCE_SCATTER must be 'native' or 'all_to_all', got {choice!r}")
        self.native_reduce_scatter = choice == "native" or (not choice and self.backend == "nccl")

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world > 1

    def duplicate(self) -> "Comm":
        """A ``Comm`` over a new process group with the same ranks, backend and timeout, booking
        into the same :class:`CommStats` (collective over this group's ranks only). Collectives
        on the two groups never pair with each other, whichever thread issues them."""
        if not self.distributed:
            return Comm(self.group, stats=self.stats, label=self.label, solo=self.group is None)
        group = self.subgroup(dist.get_process_group_ranks(self.group))
        twin = Comm(group, stats=self.stats, label=self.label)
        twin.native_reduce_scatter = self.native_reduce_scatter
        return twin

    def subgroup(self, ranks: list[int]) -> dist.ProcessGroup:
        """``dist.new_group(ranks)`` (global ranks) with this group's backend and timeout;
        collective over this group's ranks, which must all call it in the same order.

        When this group is the whole world, torch names the new group by its creation count, the
        same on every rank. Only for a proper subgroup (whose outsiders never call this) does it
        use ``use_local_synchronization``, whose names hash the ranks and the number of groups
        alive in the process: that number depends on when each rank's garbage collector freed
        an earlier optimizer's groups, and a mismatch once made a rank connect to a dead group's
        address ("Connection closed by peer")."""
        options = getattr(self.group._get_backend(torch.device("cpu")), "options", None) \
            if self.backend == "gloo" else None
        # torch exposes a group's timeout only on its backend's options (the default otherwise)
        timeout = getattr(options, "_timeout", None)
        proper = self.world != dist.get_world_size()
        return dist.new_group(ranks, timeout=timeout, backend=self.backend, use_local_synchronization=proper)

    def _count(self, kind: str, t_in: Tensor, t_out: Tensor, sent: float, received: float) -> None:
        self.stats.add(f"{kind}:{self.label}" if self.label else kind, t_in.numel() * t_in.element_size(),
                       t_out.numel() * t_out.element_size(), int(sent), int(received))

    def book(self, kind: str, bytes_in: int, bytes_out: int, sent: float, received: float) -> None:
        """Count one logical collective of ``kind`` that travels as several calls made with
        ``count=False`` (a bucket's chunked reduce-scatter): its stats then read as one call."""
        self.stats.add(f"{kind}:{self.label}" if self.label else kind, int(bytes_in), int(bytes_out), int(sent),
                       int(received))

    def book_reduce_scatter(self, numel: int, dtype: torch.dtype) -> None:
        """Book one reduce-scatter of ``numel`` elements of ``dtype`` that travels as several
        ``reduce_scatter_into_start(..., count=False)`` calls: the same figures as one
        :meth:`reduce_scatter_start` of the whole tensor."""
        if not self.distributed:
            return
        w, esize = self.world, torch.finfo(dtype).bits // 8
        moved = (w - 1) * (numel // w) * esize
        native = self.native_reduce_scatter and dtype == torch.float32
        self.book("reduce_scatter", numel * esize, (numel // w) * 4 if native else numel * esize, moved, moved)

    def reduce_scatter_into_start(self, out: Tensor, inp: Tensor, recv: Tensor | None = None,
                                  count: bool = True) -> Callable[[], None]:
        """Start ``out ← Σ_ranks chunk r of inp`` (not yet divided by W), without allocating.

        ``inp`` is contiguous ``[W·s]`` (or ``[W, s]``) of the wire dtype, ``out`` float32 ``[s]``
        (contiguous), ``recv`` a buffer like ``inp`` for the received chunks (all-to-all path;
        allocated if None). Returns a function that waits and writes ``out``: the same bits as
        :meth:`reduce_scatter_start` gives for the same ``inp``. ``count=False``: not booked
        (see :meth:`book`).
        """
        w = self.world
        s = inp.numel() // w
        moved = (w - 1) * s * inp.element_size()
        if not self.distributed:
            out.copy_(inp.reshape(-1))
            return lambda: None
        if self.native_reduce_scatter and inp.dtype == torch.float32:
            work = dist.reduce_scatter_tensor(out, inp.reshape(-1), group=self.group, async_op=True)
            if count:
                self._count("reduce_scatter", inp, out, moved, moved)
            return lambda: work.wait() and None
        if recv is None:
            recv = torch.empty_like(inp)
        work = dist.all_to_all_single(recv.view(-1), inp.reshape(-1), group=self.group, async_op=True)
        if count:
            self._count("reduce_scatter", inp, recv, moved, moved)

        def finish() -> None:
            work.wait()
            sum_in_rank_order(recv.view(w, s), out=out)
        return finish

    def reduce_scatter_start(self, inp: Tensor, scratch: Tensor | None = None) -> Callable[[], Tensor]:
        """Start summing ``inp`` (1-D, ``W·S`` elements) across ranks; rank r gets chunk r.

        Returns a function that waits and gives the float32 sum, ``S`` elements (not yet divided
        by W: the caller averages once). ``scratch``, if given, is a buffer like ``inp`` for the
        received chunks.
        """
        w = self.world
        s = inp.numel() // w
        moved = (w - 1) * s * inp.element_size()
        if not self.distributed:
            out = inp.float() if inp.dtype != torch.float32 else inp
            return lambda: out
        if self.native_reduce_scatter and inp.dtype == torch.float32:
            out = torch.empty(s, dtype=inp.dtype, device=inp.device)
            work = dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=True)
            self._count("reduce_scatter", inp, out, moved, moved)

            def finish_native() -> Tensor:
                work.wait()
                return out
            return finish_native
        recv = scratch if scratch is not None else torch.empty_like(inp)
        work = dist.all_to_all_single(recv, inp, group=self.group, async_op=True)
        self._count("reduce_scatter", inp, recv, moved, moved)

        def finish() -> Tensor:
            work.wait()
            return sum_in_rank_order(recv.view(w, s))
        return finish

    def all_gather(self, out: Tensor, inp: Tensor) -> None:
        """``out`` (``W·len(inp)``) ← the ``inp`` of every rank, in rank order."""
        if not self.distributed:
            out.copy_(inp)
            return
        _all_gather_single(out, inp, group=self.group)
        moved = (self.world - 1) * inp.numel() * inp.element_size()
        self._count("all_gather", inp, out, moved, moved)

    def all_gather_start(self, out: Tensor, inp: Tensor, count: bool = True):
        """Asynchronous :meth:`all_gather`; returns a work handle (``.wait()``). ``count=False``:
        one block of a logical all-gather sent in blocks, booked once with :meth:`book`."""
        if not self.distributed:
            out.copy_(inp)
            return Done()
        work = _all_gather_single(out, inp, group=self.group, async_op=True)
        if count:
            moved = (self.world - 1) * inp.numel() * inp.element_size()
            self._count("all_gather", inp, out, moved, moved)
        return work

    def gather(self, out: Tensor | None, inp: Tensor, dst_rank: int) -> None:
        """``out`` (``W·len(inp)``, on group rank ``dst_rank`` only; None elsewhere) ← every rank's ``inp``."""
        if not self.distributed:
            out.copy_(inp)
            return
        outs = list(out.view(self.world, -1).unbind(0)) if out is not None else None
        dist.gather(inp, outs, dst=dist.get_global_rank(self.group, dst_rank), group=self.group)
        n = inp.numel() * inp.element_size()
        mine = self.rank == dst_rank
        self._count("gather", inp, out if mine else inp, 0 if mine else n, (self.world - 1) * n if mine else 0)

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> None:
        """In place over all ranks (SUM unless ``op`` says otherwise)."""
        if not self.distributed:
            return
        dist.all_reduce(t, op=op, group=self.group)
        moved = 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        self._count("all_reduce", t, t, moved, moved)

    def all_reduce_start(self, t: Tensor, op=dist.ReduceOp.SUM):
        """Asynchronous :meth:`all_reduce`; returns a work handle (``.wait()``)."""
        if not self.distributed:
            return Done()
        work = dist.all_reduce(t, op=op, group=self.group, async_op=True)
        moved = 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        self._count("all_reduce", t, t, moved, moved)
        return work

    def broadcast(self, t: Tensor, src_rank: int = 0) -> None:
        """In place, from group rank ``src_rank``."""
        if not self.distributed:
            return
        dist.broadcast(t, src=dist.get_global_rank(self.group, src_rank), group=self.group)
        n = t.numel() * t.element_size()
        self._count("broadcast", t, t, n if self.rank == src_rank else 0, 0 if self.rank == src_rank else n)

    def all_to_all_start(self, out: Tensor, inp: Tensor):
        """Asynchronous ``all_to_all_single`` with equal splits; returns a work handle (``.wait()``)."""
        if not self.distributed:
            out.copy_(inp)
            return Done()
        work = dist.all_to_all_single(out, inp, group=self.group, async_op=True)
        moved = (self.world - 1) * inp.numel() * inp.element_size() // self.world
        self._count("all_to_all", inp, out, moved, moved)
        return work

    def all_to_all(self, out: Tensor, inp: Tensor) -> None:
        """``all_to_all_single`` with equal splits."""
        if not self.distributed:
            out.copy_(inp)
            return
        dist.all_to_all_single(out, inp, group=self.group)
        moved = (self.world - 1) * inp.numel() * inp.element_size() // self.world
        self._count("all_to_all", inp, out, moved, moved)


def average_gradients(params, process_group=None) -> None:
    """All-reduce and average the ``.grad`` of ``params`` in place, in one coalesced call.

    For parameters trained by another optimizer (say AdamW on embeddings and norms) beside a
    standalone sharded optimizer: call it after backward and before that optimizer's step, so that
    every gradient is averaged exactly once. Parameters whose grad is None are skipped (every rank
    must skip the same ones). Sends ``2(W−1)/W`` times the gradients' bytes per rank. No-op in a
    world of one. ``process_group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group).
    """
    comm = Comm(resolve_group(process_group))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not comm.distributed:
        return
    for g in grads:
        if g.is_sparse:
            raise TypeError("average_gradients does not handle sparse gradients")
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for dtype, gs in by_dtype.items():
        flat = torch.cat([g.reshape(-1) for g in gs])
        comm.all_reduce(flat)
        flat.div_(comm.world)
        pos = 0
        for g in gs:
            g.copy_(flat[pos : pos + g.numel()].view_as(g))
            pos += g.numel()
