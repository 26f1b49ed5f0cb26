"""Updates that overlap the next forward (``overlap_updates=True``).

Without it, :meth:`step` returns with every parameter updated. With it, ``step()`` packs the
1-bit updates as usual, reads their zero flags (the same one all-reduce and host sync), *starts*
every bucket's all-gather and returns; each bucket is applied by the first forward pre-hook of a
module that owns one of its parameters, after waiting for its bits, so the all-gathers travel
while the data loader, the optimizer's bookkeeping and the first layers of the next forward run.

What is deferred: the 1-bit update all-gathers (Lion; Leo's sign-rule parameters; Leo's matrices
with ``update_comm="1bit"``). Leo's exact matrix updates and "adamw" groups are applied inside
``step()`` as before.

Contract:

* no collective is issued after ``step()`` returns (all are started in it, in the same order on
  every rank: the order in which the buckets' modules appear in ``model.modules()``, a proxy of
  the forward order that needs no communication), so a forward that skips modules, runs under
  ``torch.no_grad()``, or is repeated for gradient accumulation cannot make ranks disagree; a
  pre-hook only waits and applies;
* each bucket is applied exactly once, before the first forward of any module owning one of its
  parameters (tied weights: whichever module comes first); with the same bytes and arithmetic as
  without overlap, so parameters and replicas are bitwise the same;
* :meth:`synchronize` applies everything still pending; every public entry point of the
  optimizer that reads or writes parameters or state calls it first (the next ``step``,
  ``state_dict``/``load_state_dict``, the sharded/consolidated checkpoint calls,
  ``verify_replicas``, ``clip_grad_norm_``). ``zero_grad`` does not: it touches only ``.grad``,
  which a pending update never reads, and completing there would end the overlap in the usual
  ``step(); zero_grad()`` loop;
* a raw read of a parameter between ``step()`` and its module's forward (EMA, logging, an
  evaluation that reads weights without calling the module) sees the old value: call
  ``opt.synchronize()`` first.

Memory: the gathered bits of every deferred bucket are alive until applied, ``W·N/8`` bytes at
most (``W/32`` of the fp32 parameters' bytes, per rank) — the price of having them all in
flight; without overlap, three buckets' worth.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .collectives import Comm
from .partition import Layout
from .signs import InFlight, Packed, start_packed

__all__ = ["DeferredUpdates"]


class DeferredUpdates:
    """The buckets whose update all-gathers ``step()`` left in flight, and the module pre-hooks
    that apply them."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._pending: dict[int, InFlight] = {}
        self._handles: list[Any] = []
        #: bucket index -> launch rank: the order the forward will want them (see :meth:`register`)
        self._rank: dict[int, int] = {}

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    def register(self, model: nn.Module) -> None:
        """A forward pre-hook on every module of ``model`` that owns (directly) a held parameter."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for module in model.modules():
            buckets = sorted({self.layout.where[id(p)][0] for p in module.parameters(recurse=False)
                              if id(p) in self.layout.where})
            for bi in buckets:
                # first appearance in model.modules() (definition order): the usual forward order,
                # and the same on every rank, as the launch order of collectives must be. Buckets
                # are laid out in reverse (backward's) order, so launching by index would send the
                # first layers' bits last and make the forward wait for all of them (measured).
                self._rank.setdefault(bi, len(self._rank))
            if buckets:
                self._handles.append(module.register_forward_pre_hook(
                    lambda _m, _args, buckets=buckets: self.complete(buckets)))

    def launch(self, comm: Comm, packed: list[Packed]) -> None:
        """Start every packed bucket's all-gathers (collective), in the order the next forward
        needs them; applied later."""
        packed = sorted(packed, key=lambda p: (self._rank.get(p.index, len(self._rank)), p.index))
        for flight in start_packed(comm, packed):
            self._pending[flight.packed.index] = flight

    def complete(self, buckets: list[int]) -> None:
        for bi in buckets:
            flight = self._pending.pop(bi, None)
            if flight is not None:
                flight.finish()

    def complete_all(self) -> None:
        # in bucket order, the same on every rank (the waits issue no collectives either way)
        self.complete(sorted(self._pending))

    def __len__(self) -> int:
        return len(self._pending)
