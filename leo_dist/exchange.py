"""Phase 1 of a sharded step: the gradient exchange.

:class:`GradientExchange` owns everything between a local ``.grad`` and the averaged float32
shard the step consumes. Local gradients are staged into each bucket's flat send buffer (by
:meth:`GradientExchange.collect` from ``.grad``, or by the DDP hook during backward through
:meth:`GradientExchange.stage`), and a bucket is sent as soon as it is complete: a reduce-scatter
(fp32/bf16 on the wire) or, when compressing (``grad_comm="1bit"`` after warm-up), an all-to-all of
compressed signs. At most two buckets are in flight, so send and receive buffers stay bounded by
twice the bucket size. The averaged shards then wait for ``clip_grad_norm_`` and ``step()``.

Bytes per rank and bucket of ``P`` padded elements: reduce-scatter ``(W−1)/W·P·wire_bytes`` sent
and received; 1-bit all-to-all ``(W−1)/W·W·(S/8 + 4·⌈S/1024⌉)`` with ``S = P/W``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import Tensor

from . import onebit
from .collectives import Comm
from .partition import Layout
from .validation import check_grad

__all__ = ["GradientExchange", "WIRE_DTYPES"]

# grad_comm -> dtype the local gradients are staged in (1bit compresses from float32)
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "1bit": torch.float32}

_MAX_INFLIGHT = 2


class GradientExchange:
    """Reduce-scatter of one step's gradients into this rank's averaged shards.

    Args:
        layout: the optimizer's :class:`~leo_dist.partition.Layout`.
        comm: the :class:`~leo_dist.collectives.Comm` to send on.
        grad_comm: "fp32", "bf16" or "1bit" (see :data:`WIRE_DTYPES`).
        device: where the buffers live.
        compressing: called as each bucket is sent; True to send it 1-bit (``grad_comm="1bit"``
            past its warm-up), False for the exact fp32 exchange.

    State kept across steps: ``grad_error`` (``grad_comm="1bit"``: per bucket, float32 ``[P]``, the
    error feedback of this rank's compressed gradients). Everything else lives for one step and
    is dropped by :meth:`reset`.
    """

    def __init__(self, layout: Layout, comm: Comm, grad_comm: str, device: torch.device,
                 compressing: Callable[[], bool] = lambda: False):
        if grad_comm not in WIRE_DTYPES:
            raise ValueError(f"grad_comm must be one of {sorted(WIRE_DTYPES)}, got {grad_comm!r}")
        self.layout, self.comm, self.grad_comm, self.device = layout, comm, grad_comm, device
        self.wire = WIRE_DTYPES[grad_comm]
        self.compressing = compressing
        # error feedback of the 1-bit exchange: allocated up front so that checkpoints always have it
        self.grad_error: dict[int, Tensor] = {
            bi: torch.zeros(b.padded, dtype=torch.float32, device=device)
            for bi, b in enumerate(layout.buckets)} if grad_comm == "1bit" else {}
        self.reset()

    def reset(self) -> None:
        """Forget this step's buffers (sent or not)."""
        n = len(self.layout.buckets)
        self._send: list[Tensor | None] = [None] * n
        self._arrived: list[set] = [set() for _ in range(n)]
        self._pending: list[Callable[[], Tensor] | None] = [None] * n
        self._shards: list[Tensor | None] = [None] * n
        self._inflight: deque[int] = deque()

    def owns(self, param: Tensor) -> bool:
        return id(param) in self.layout.where

    def stage(self, param: Tensor, grad: Tensor | None, inv_scale: Tensor | None = None) -> None:
        """Copy one parameter's local gradient (None: zeros) into its bucket, times ``inv_scale``
        (the AMP unscaling) when given; send the bucket once all its parameters have arrived."""
        bi, slot = self.layout.where[id(param)]
        b = self.layout.buckets[bi]
        if self._pending[bi] is not None or self._shards[bi] is not None:
            raise RuntimeError("a gradient arrived for a bucket already sent this step: call step() after "
                               "each backward, or accumulate under ddp_model.no_sync()")
        if self._send[bi] is None:
            buf = torch.empty(b.padded, dtype=self.wire, device=self.device)
            buf[b.numel :].zero_()
            self._send[bi] = buf
        dst = self._send[bi][slot.offset : slot.offset + slot.numel]
        if grad is None:
            dst.zero_()
        else:
            dst.copy_(grad.reshape(-1))
            if inv_scale is not None:
                dst.mul_(inv_scale)
        self._arrived[bi].add(id(slot))
        if len(self._arrived[bi]) == len(b.slots):
            self._launch(bi)

    def _launch(self, bi: int) -> None:
        while len(self._inflight) >= _MAX_INFLIGHT:
            self._finish(self._inflight.popleft())
        b, world = self.layout.buckets[bi], self.comm.world
        if self.grad_comm == "1bit" and self.compressing():
            payload = onebit.compress_grad_(self._send[bi], self.grad_error[bi], world, b.shard, b.numel)
            recv = torch.empty_like(payload)
            work = self.comm.all_to_all_start(recv, payload)

            def averaged() -> Tensor:
                work.wait()
                return onebit.decode_grad(recv, world, b.shard)
        else:
            summed = self.comm.reduce_scatter_start(self._send[bi])

            def averaged() -> Tensor:
                total = summed()
                return total.div_(world) if world > 1 else total  # the only division by W
        self._pending[bi] = averaged
        self._inflight.append(bi)

    def _finish(self, bi: int) -> None:
        self._shards[bi] = self._pending[bi]()
        self._pending[bi] = None
        self._send[bi] = None

    def collect(self) -> list[Tensor]:
        """The averaged gradient shard of every bucket (float32, ``bucket.shard`` elements each),
        staging from ``.grad`` and sending whatever the DDP hook has not already sent."""
        for bi, b in enumerate(self.layout.buckets):
            if self._pending[bi] is None and self._shards[bi] is None:
                for s in b.slots:
                    if id(s) not in self._arrived[bi]:
                        if s.param.grad is not None:
                            check_grad(s.param)
                        self.stage(s.param, s.param.grad)
        while self._inflight:
            self._finish(self._inflight.popleft())
        return self._shards  # type: ignore[return-value]
