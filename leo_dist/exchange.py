"""The gradient exchange of the sharded optimizers (phase 1 of a step), as a mixin.

Local gradients are staged into each bucket's flat send buffer (by ``step()`` from ``.grad``, or
by the DDP hook during backward), and a bucket is sent as soon as it is complete: a
reduce-scatter (fp32/bf16) or, with ``grad_comm="1bit"`` after warm-up, an all-to-all of
compressed signs. At most two buckets are in flight, so transient buffers stay bounded by twice
the bucket size. The averaged float32 shards then wait for ``clip_grad_norm_`` and ``step()``.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import onebit
from .partition import Slot
from .validation import check_grad

__all__ = ["GradientExchange"]

_MAX_INFLIGHT = 2


class GradientExchange:
    """Mixin for ``_ShardedOptimizer``: needs ``_buckets``, ``_comm``, ``_wire``, ``_device``,
    ``grad_comm``, ``grad_comm_warmup``, ``_steps_done``, ``_grad_error``, ``_hook_attached``,
    ``_hook_scaler``."""

    def _reset_exchange(self) -> None:
        n = len(self._buckets)
        self._send: list[Tensor | None] = [None] * n
        self._arrived: list[set] = [set() for _ in range(n)]
        self._pending: list[Callable[[], Tensor] | None] = [None] * n
        self._shards: list[Tensor | None] = [None] * n
        self._inflight: deque[int] = deque()

    def _stage(self, bi: int, slot: Slot, grad: Tensor | None, inv_scale: Tensor | None = None) -> None:
        """Copy one parameter's local gradient into its bucket (times ``inv_scale``, the AMP
        unscaling, when given); send the bucket once complete."""
        b = self._buckets[bi]
        if self._pending[bi] is not None or self._shards[bi] is not None:
            raise RuntimeError("a gradient arrived for a bucket already sent this step: call step() after "
                               "each backward, or accumulate under ddp_model.no_sync()")
        if self._send[bi] is None:
            buf = torch.empty(b.padded, dtype=self._wire, device=self._device)
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

    @property
    def _compressing(self) -> bool:
        return self.grad_comm == "1bit" and self._steps_done >= self.grad_comm_warmup

    def _launch(self, bi: int) -> None:
        """Start bucket ``bi``'s exchange; ``_pending[bi]`` then waits and gives the averaged shard."""
        while len(self._inflight) >= _MAX_INFLIGHT:
            self._finish(self._inflight.popleft())
        b, world = self._buckets[bi], self._comm.world
        if self._compressing:
            err = self._grad_error.get(bi)
            if err is None:
                err = self._grad_error[bi] = torch.zeros(b.padded, dtype=torch.float32, device=self._device)
            payload = onebit.compress_grad_(self._send[bi], err, world, b.shard, b.numel)
            recv = torch.empty_like(payload)
            work = self._comm.all_to_all_start(recv, payload)

            def averaged() -> Tensor:
                work.wait()
                return onebit.decode_grad(recv, world, b.shard)
        else:
            summed = self._comm.reduce_scatter_start(self._send[bi])

            def averaged() -> Tensor:
                total = summed()
                return total.div_(world) if world > 1 else total  # the only division by W
        self._pending[bi] = averaged
        self._inflight.append(bi)

    def _finish(self, bi: int) -> None:
        self._shards[bi] = self._pending[bi]()
        self._pending[bi] = None
        self._send[bi] = None

    def _reduced_gradients(self) -> list[Tensor]:
        """The averaged gradient shard of every bucket (float32, ``bucket.shard`` elements each),
        exchanging whatever the DDP hook has not already sent."""
        for bi, b in enumerate(self._buckets):
            if self._pending[bi] is None and self._shards[bi] is None:
                for s in b.slots:
                    if id(s) not in self._arrived[bi]:
                        if s.param.grad is not None:
                            check_grad(s.param)
                        self._stage(bi, s, s.param.grad)
        while self._inflight:
            self._finish(self._inflight.popleft())
        return self._shards  # type: ignore[return-value]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the averaged gradients (the ones the step will use) to a global norm.

        Collective: every rank must call it, after backward and before :meth:`step`. Triggers the
        gradient exchange if the DDP hook has not. Returns the total norm before clipping (as
        ``torch.nn.utils.clip_grad_norm_`` does). Sends one float.
        """
        max_norm = float(max_norm)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        norm_type = float(norm_type)
        if not (norm_type == math.inf or norm_type > 0):
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        shards = self._reduced_gradients()
        if norm_type == math.inf:
            local = torch.stack([s.abs().max() if s.numel() else s.new_zeros(()) for s in shards]).max()
            self._comm.all_reduce(local, dist.ReduceOp.MAX)
            total = local
        else:
            local = torch.stack([s.abs().pow(norm_type).sum() for s in shards]).sum()
            self._comm.all_reduce(local)
            total = local.pow(1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for s in shards:
            s.mul_(coef)
        return total

    # GradScaler calls step() even when this rank saw an inf, so that every rank reaches the
    # collectives; step() decides to skip from the *averaged* gradients, on all ranks alike.
    _step_supports_amp_scaling = True

    def _amp_unscale_and_check(self, scaler, shards: list[Tensor]) -> bool:
        """Unscale the averaged shards if still scaled; True when any rank's shard is non-finite.

        Writes the global verdict into the scaler's record for this optimizer, so that
        ``scaler.update()`` backs off identically on every rank (its own check saw only local
        gradients). Sends one float.
        """
        from torch.amp.grad_scaler import OptState

        record = scaler._per_optimizer_states[id(self)]
        if self._hook_attached:
            if self._hook_scaler is not scaler:
                raise RuntimeError("with a GradScaler and the DDP hook, pass the scaler to "
                                   "leo_dist.hooks.attach(ddp_model, optimizer, grad_scaler=scaler)")
        elif record["stage"] is OptState.READY:
            inv = scaler._scale.double().reciprocal().float()
            for s in shards:
                s.mul_(inv)
        bad = torch.zeros((), dtype=torch.float32, device=self._device)
        for s in shards:
            bad = torch.maximum(bad, (~torch.isfinite(s)).any().float())
        self._comm.all_reduce(bad, dist.ReduceOp.MAX)
        record["found_inf_per_device"] = {scaler._scale.device: bad.to(scaler._scale.device)}
        return bool(bad)

