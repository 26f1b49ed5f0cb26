"""The two memory-bound passes of a sharded step, behind one interface.

* :func:`sign_shard_step_` — on the owning rank: read the reduced gradient shard and the momentum
  shard, write the new momentum, the packed sign bits of ``c`` and the bitmap of exact zeros.
* :func:`apply_signs_` — on every rank: read packed bits (and zeros) and a parameter, write the
  parameter ``p·(1−lr·wd) − lr·scale·sign``.

The torch implementations (:func:`_sign_shard_step_torch`, :func:`_apply_signs_torch`) define the
results; faster back ends must match them: bits, zero bitmaps and momentum bitwise, parameters to
float rounding. The public functions pick a back end from the tensors:

* contiguous CPU float32/bfloat16 tensors, with the C library built: :mod:`leo_dist.cpu_step`
  (one pass over memory);
* anything else (CUDA tensors with ``fused=False``, other dtypes, no C compiler): the torch code.

The Triton kernels of :mod:`leo_dist.kernels` have the same signatures; callers that chose
``fused`` use that module directly (it imports Triton, so it is never imported from here).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import apply_update_, interpolate, update_momentum_
from .packing import pack_mask, unpack_signs

__all__ = ["sign_shard_step_", "apply_signs_"]


def _use_cpu_ext(*tensors: Tensor) -> bool:
    from . import cpu_step
    return cpu_step.supports(*tensors) and cpu_step.available()


def sign_shard_step_(
    grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int, beta1: float, beta2: float
) -> Tensor:
    """One Lion-style local step on a flat shard; see :func:`_sign_shard_step_torch` for the contract."""
    if _use_cpu_ext(grad, exp_avg) and bits.is_contiguous() and zeros.is_contiguous():
        from . import cpu_step
        return cpu_step.sign_shard_step_(grad, exp_avg, bits, zeros, n_valid, beta1, beta2)
    return _sign_shard_step_torch(grad, exp_avg, bits, zeros, n_valid, beta1, beta2)


def apply_signs_(param: Tensor, bits: Tensor, zeros: Tensor | None, lr: float, weight_decay: float,
                 scale: float) -> None:
    """Decode and apply signs in place; see :func:`_apply_signs_torch` for the contract."""
    if (_use_cpu_ext(param) and bits.is_contiguous() and (zeros is None or zeros.is_contiguous())
            and bits.numel() >= (param.numel() + 7) // 8
            and (zeros is None or zeros.numel() >= (param.numel() + 7) // 8)):
        from . import cpu_step
        cpu_step.apply_signs_(param, bits, zeros, lr, weight_decay, scale)
        return
    _apply_signs_torch(param, bits, zeros, lr, weight_decay, scale)


def _sign_shard_step_torch(
    grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int, beta1: float, beta2: float
) -> Tensor:
    """One Lion-style local step on a flat shard.

    Args:
        grad: 1-D reduced (averaged) gradient shard, ``S`` elements, S a multiple of 8, float32
            or bfloat16. Read only.
        exp_avg: 1-D momentum shard, ``S`` elements, float32 or bfloat16. Updated in place:
            ``exp_avg ← β2·exp_avg + (1−β2)·grad``.
        bits: ``uint8[S // 8]``, written: bit ``i`` set iff ``c_i > 0`` and ``i < n_valid``.
        zeros: ``uint8[S // 8]``, written: bit ``i`` set iff ``c_i == 0`` and ``i < n_valid``.
        n_valid: elements of the shard that belong to parameters (the rest is padding, whose
            bits are written as 0 and whose zeros never count).

    Returns a 0-d uint8 tensor on the shard's device: 1 when some valid ``c_i == 0``, else 0.
    (A tensor, so that a GPU back end need not synchronise.)
    """
    c = interpolate(exp_avg, grad, beta1)
    if n_valid < c.numel():
        c[n_valid:] = float("nan")  # NaN is neither > 0 nor == 0: padding sets no bit
    pack_mask(c > 0, bits)
    is_zero = c == 0
    pack_mask(is_zero, zeros)
    update_momentum_(exp_avg, grad, beta2)
    return is_zero.any().to(torch.uint8)


def _apply_signs_torch(param: Tensor, bits: Tensor, zeros: Tensor | None, lr: float, weight_decay: float,
                       scale: float) -> None:
    """Decode ``param.numel()`` signs from ``bits`` (and ``zeros``) and apply them in place.

    ``param`` is any contiguous floating tensor; ``bits``/``zeros`` are uint8 with at least
    ``(numel + 7) // 8`` bytes, bit ``i`` for flat element ``i``.
    """
    sign = unpack_signs(bits, param.numel(), zeros, dtype=torch.float32)
    apply_update_(param, sign, lr, weight_decay, scale)
