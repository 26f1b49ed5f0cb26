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

Streamed steps (docs/overlap.md, "Streamed steps"): with the DDP hook, the background sender,
``grad_comm`` fp32 or bf16, no GradScaler and sign buckets only (Lion; Leo with
``orthogonalize=False``), ``step()`` goes further. It takes the non-finite verdict on every
rank's *local* gradients (one all-reduce of two floats), hands the rest of the step to the sender
and returns: the buckets not yet sent go in forward order, each is stepped as soon as its shard
is complete and its all-gather starts at once, and :meth:`DeferredUpdates.publish` makes it
available to the pre-hooks, which wait for it. The contract above holds unchanged, plus:

* a local gradient element of magnitude ``float32 max / (2·W)`` or more counts as non-finite (a
  sum of W of them could overflow the average, which nothing checks any more);
* a forward post-hook on the model waits until the step has read every gradient it sends
  (DDP's buckets, rewritten by the next backward); ``zero_grad(set_to_none=False)`` waits too;
* ``comm_stats()`` waits for the step to end (its bytes are booked by then), applying nothing;
* an error on the sender (a peer died) is raised by every later wait, naming the sender.

Memory: the gathered bits of every deferred bucket are alive until applied, ``W·N/8`` bytes at
most (``W/32`` of the fp32 parameters' bytes, per rank) — the price of having them all in
flight; without overlap, three buckets' worth.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

import torch.nn as nn

from .collectives import Comm
from .partition import Layout
from .signs import InFlight, Packed, start_packed

__all__ = ["DeferredUpdates"]


def _sender_failure(error: BaseException) -> RuntimeError:
    return RuntimeError("leo_dist: the streamed step failed on the background sender "
                        f"({type(error).__name__}: {error})")


class DeferredUpdates:
    """The buckets whose update all-gathers ``step()`` left in flight, and the module pre-hooks
    that apply them."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._pending: dict[int, InFlight] = {}
        self._handles: list[Any] = []
        #: bucket index -> launch rank: the order the forward will want them (see :meth:`register`)
        self._rank: dict[int, int] = {}
        # a streamed step (docs/overlap.md, "Streamed steps") publishes its buckets from the sender thread
        self._cond = threading.Condition()
        self._expected: set[int] = set()
        self._filled = True   # every gradient of the streamed step has been read (sent)
        self._done = True     # the streamed step's program has ended
        self._error: BaseException | None = None
        self._published: set[int] = set()  # buckets whose gathers the sender started

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
        # A streamed step reads DDP's gradient buckets after step() returns; the next backward
        # rewrites them. The forward of the modules that use a bucket waits for it anyway; this
        # covers the buckets of modules the forward skipped (usually a wait for nothing).
        self._handles.append(model.register_forward_hook(lambda *_: self.wait_filled()))

    def forward_rank(self, bi: int) -> tuple[int, int]:
        """Sort key of bucket ``bi`` in the order the forward needs it (the same on every rank)."""
        return self._rank.get(bi, len(self._rank)), bi

    def launch(self, comm: Comm, packed: list[Packed]) -> None:
        """Start every packed bucket's all-gathers (collective), in the order the next forward
        needs them; applied later."""
        packed = sorted(packed, key=lambda p: self.forward_rank(p.index))
        for flight in start_packed(comm, packed):
            self._pending[flight.packed.index] = flight

    # --------------------------------------------------------------- streamed steps
    def expect(self, buckets: Iterable[int]) -> None:
        """A streamed step will :meth:`publish` each of ``buckets`` from another thread."""
        with self._cond:
            self._expected = set(buckets)
            self._filled = self._done = False
            self._error = None

    def publish(self, bi: int, flight: InFlight) -> None:
        with self._cond:
            self._pending[bi] = flight
            self._published.add(bi)
            self._expected.discard(bi)
            self._cond.notify_all()

    def filled(self) -> None:
        """Every gradient of the streamed step has been read: the next backward may overwrite them."""
        with self._cond:
            self._filled = True
            self._cond.notify_all()

    def end(self, error: BaseException | None) -> None:
        """The streamed step's program ended (``error``: it failed; every waiter raises)."""
        with self._cond:
            self._filled = self._done = True
            self._error = error
            self._cond.notify_all()

    def wait_filled(self) -> None:
        """Until the streamed step in progress (if any) has read every gradient it sends."""
        self._await(lambda: self._filled)

    def wait_done(self) -> None:
        """Until the streamed step in progress (if any) has ended; applies nothing."""
        self._await(lambda: self._done)

    def _await(self, ready) -> None:
        with self._cond:
            while not ready() and self._error is None:
                self._cond.wait()
            if self._error is not None:  # some bucket was never applied: replicas may differ
                raise _sender_failure(self._error) from self._error

    # --------------------------------------------------------------- applying
    def complete(self, buckets: list[int]) -> None:
        for bi in buckets:
            if bi in self._expected:
                self._await(lambda: bi not in self._expected)
            with self._cond:
                flight = self._pending.pop(bi, None)
                streamed = bi in self._published
                self._published.discard(bi)
            if flight is not None:
                try:
                    flight.finish()
                except RuntimeError as e:
                    if not streamed:
                        raise
                    # the sender's gather of this bucket failed: the same report as a failure the
                    # sender saw itself, and every later waiter raises too (replicas may differ)
                    with self._cond:
                        self._error = e
                        self._cond.notify_all()
                    raise _sender_failure(e) from e

    def complete_all(self) -> None:
        self._await(lambda: self._done)
        # in bucket order, the same on every rank (the waits issue no collectives either way)
        self.complete(sorted(self._pending))

    def __len__(self) -> int:
        return len(self._pending) + (not self._done)
