"""Triton kernels of the local step (the ``fused=True`` back end). Imported only when fused.

Every kernel is a single streaming pass that computes in float32 and reads and writes each byte
once (the bytes-per-element table is in docs/kernels.md):

* :func:`lion_step` / the sign part of :func:`leo_step` — ``_lion_kernel``: read ``p, g, m``,
  write ``p, m``.
* :func:`sign_shard_step_` — ``_sign_shard_kernel``: read ``g, m``, write ``m``, the packed sign
  bits and the zero bitmap; one masked atomic per block raises the "some zero" flag, so the host
  never synchronises.
* :func:`apply_signs_` — ``_apply_signs_kernel``: read bits (and zeros) and ``p``, write ``p``.
* Leo's 2-D rule, on a flat slice ``[start, end)`` of a row-major (R, C) matrix (the whole matrix
  for the single-process optimizer, a shard's part of it for the sharded one), in three passes:
  :func:`leo2d_partial_sumsq` (row/column sums of ``c²``), :func:`leo2d_partial_usq` (``Σu²``),
  :func:`leo2d_update_` (write ``s·u`` or apply it to the parameter; update the momentum).
  The cross-rank reductions of the sharded optimizer go between these calls.

Exactness: ``lerp`` is written as torch computes it, with one explicit fused multiply-add, and
fusion of any other multiply-add is turned off at launch (``enable_fp_fusion=False``), so bits,
zero bitmaps, momentum and sign-rule parameters equal the torch path bit for bit; 2-D parameters
agree to float rounding (summation order of the norms).

No autotuning: every kernel writes its inputs in place, and an autotuner re-running it would apply
the step several times. Block sizes are fixed, chosen so that loads vectorise to 128-bit
(``ld.global.v4``) when the pointers and sizes are 16-element aligned, which Triton's integer
specialisation detects on its own.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .functional import leo_scale
from .cpu_step import check_apply_args, check_shard_args, decay_args

__all__ = [
    "lion_step", "leo_step", "sign_shard_step_", "apply_signs_",
    "leo2d_partial_sumsq", "leo2d_partial_usq", "leo2d_update_",
]

BLOCK = 2048          # elements per program of the flat kernels
NUM_WARPS = 4
TILE_R, TILE_C = 16, 128   # tile of the 2-D kernels (rows, columns)
ROWS_PER_PROGRAM = 128     # rows a 2-D program walks, carrying its column sums in registers

_DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------------------- jit


@triton.jit
def _lerp(start, end, w, wm1, SMALL: tl.constexpr):
    # torch.lerp: start + w·(end−start) for |w| < 0.5, else end + (w−1)·(end−start), one fma each.
    d = end - start
    if SMALL:
        r = tl.fma(d, w, start)
    else:
        r = tl.fma(d, wm1, end)
    return r


@triton.jit
def _out(x, ptr):
    # Value to store through ptr: float32 as is; bfloat16 rounded to nearest even with integer ops,
    # the rule of torch's c10::BFloat16 (NaN -> 0x7FC0). Written out because the interpreter's
    # float32 -> bfloat16 cast truncates, and the test must see what the GPU computes.
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _sign(c):
    # sign(0) = 0 and sign(NaN) = 0, as torch.sign on the CPU.
    return tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))


@triton.jit
def _lion_kernel(p_ptr, g_ptr, m_ptr, n, beta1, b1m1, w2, w2m1, decay, step,
                 B1_SMALL: tl.constexpr, W2_SMALL: tl.constexpr, USE_DECAY: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    s = _sign(_lerp(g, m, beta1, b1m1, B1_SMALL))
    if USE_DECAY:
        p = p * decay
    p = p + step * s
    tl.store(p_ptr + offs, _out(p, p_ptr), mask=mask)
    tl.store(m_ptr + offs, _out(_lerp(m, g, w2, w2m1, W2_SMALL), m_ptr), mask=mask)


@triton.jit
def _sign_shard_kernel(g_ptr, m_ptr, bits_ptr, zeros_ptr, flag_ptr, n_bytes, n_valid,
                       beta1, b1m1, w2, w2m1,
                       B1_SMALL: tl.constexpr, W2_SMALL: tl.constexpr, BYTES: tl.constexpr):
    # A (BYTES, 8) tile: row j is byte j, column e its bit e (element 8j + e, LSB first).
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    lane = tl.arange(0, 8)
    offs = byte[:, None] * 8 + lane[None, :]
    row_ok = byte < n_bytes
    mask = row_ok[:, None]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    c = _lerp(g, m, beta1, b1m1, B1_SMALL)
    valid = offs < n_valid
    weight = (1 << lane)[None, :]
    pos = tl.sum(tl.where((c > 0) & valid, weight, 0), axis=1)
    zer = tl.sum(tl.where((c == 0) & valid, weight, 0), axis=1)
    tl.store(bits_ptr + byte, pos.to(tl.uint8), mask=row_ok)
    tl.store(zeros_ptr + byte, zer.to(tl.uint8), mask=row_ok)
    tl.store(m_ptr + offs, _out(_lerp(m, g, w2, w2m1, W2_SMALL), m_ptr), mask=mask)
    tl.atomic_or(flag_ptr, 1, mask=tl.max(zer, axis=0) > 0)


@triton.jit
def _apply_signs_kernel(p_ptr, bits_ptr, zeros_ptr, n, decay, step,
                        HAS_ZEROS: tl.constexpr, USE_DECAY: tl.constexpr, BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    lane = tl.arange(0, 8)
    offs = byte[:, None] * 8 + lane[None, :]
    mask = offs < n
    row_ok = byte * 8 < n
    b = tl.load(bits_ptr + byte, mask=row_ok, other=0).to(tl.int32)
    s = (((b[:, None] >> lane[None, :]) & 1) * 2 - 1).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(zeros_ptr + byte, mask=row_ok, other=0).to(tl.int32)
        s = tl.where(((z[:, None] >> lane[None, :]) & 1) != 0, 0.0, s)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if USE_DECAY:
        p = p * decay
    p = p + step * s
    tl.store(p_ptr + offs, _out(p, p_ptr), mask=mask)


@triton.jit
def _tile(start, end, n_cols, r1, rows, cols):
    # Matrix row/column indices -> (offset into the slice, mask) for the slice [start, end).
    flat = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    mask = (rows[:, None] < r1) & (cols[None, :] < n_cols) & (flat >= start) & (flat < end)
    return flat - start, mask


@triton.jit
def _leo2d_sumsq_kernel(g_ptr, m_ptr, row_part_ptr, col_part_ptr, start, end, n_cols, r0, r1, beta1, b1m1,
                        B1_SMALL: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                        ROWS: tl.constexpr):
    # Program (i, j) walks rows r0 + i·ROWS … in tiles, columns j·TILE_C …; it writes the row sums
    # of each tile to row_part[j, row − r0] and its column sums once, to col_part[i, col].
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    n_rows = r1 - r0
    col_acc = tl.zeros([TILE_C], dtype=tl.float32)
    for t in range(0, ROWS, TILE_R):
        rows = r0 + pid_r * ROWS + t + tl.arange(0, TILE_R)
        offs, mask = _tile(start, end, n_cols, r1, rows, cols)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = _lerp(g, m, beta1, b1m1, B1_SMALL)
        c2 = tl.where(mask, c * c, 0.0)
        col_acc += tl.sum(c2, axis=0)
        tl.store(row_part_ptr + pid_c.to(tl.int64) * n_rows + (rows - r0), tl.sum(c2, axis=1), mask=rows < r1)
    tl.store(col_part_ptr + pid_r.to(tl.int64) * n_cols + cols, col_acc, mask=cols < n_cols)


@triton.jit
def _leo2d_usq_kernel(g_ptr, m_ptr, rr_ptr, kk_ptr, part_ptr, start, end, n_cols, r0, r1, beta1, b1m1,
                      B1_SMALL: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                      ROWS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    kk = tl.load(kk_ptr + cols, mask=cols < n_cols, other=1.0)
    acc = tl.zeros([TILE_R, TILE_C], dtype=tl.float32)
    for t in range(0, ROWS, TILE_R):
        rows = r0 + pid_r * ROWS + t + tl.arange(0, TILE_R)
        offs, mask = _tile(start, end, n_cols, r1, rows, cols)
        rr = tl.load(rr_ptr + (rows - r0), mask=rows < r1, other=1.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = _lerp(g, m, beta1, b1m1, B1_SMALL)
        u = c / rr[:, None] + c / kk[None, :]
        acc += tl.where(mask, u * u, 0.0)
    tl.store(part_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _leo2d_update_kernel(g_ptr, m_ptr, rr_ptr, kk_ptr, scale_ptr, out_ptr, start, end, n_cols, r0, r1,
                         beta1, b1m1, w2, w2m1, decay, neg_lr,
                         B1_SMALL: tl.constexpr, W2_SMALL: tl.constexpr, APPLY: tl.constexpr,
                         USE_DECAY: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                         ROWS: tl.constexpr):
    # APPLY: out is the parameter slice, p ← p·decay + neg_lr·(s·u). Else out ← s·u.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    kk = tl.load(kk_ptr + cols, mask=cols < n_cols, other=1.0)
    s = tl.load(scale_ptr)
    for t in range(0, ROWS, TILE_R):
        rows = r0 + pid_r * ROWS + t + tl.arange(0, TILE_R)
        offs, mask = _tile(start, end, n_cols, r1, rows, cols)
        rr = tl.load(rr_ptr + (rows - r0), mask=rows < r1, other=1.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        c = _lerp(g, m, beta1, b1m1, B1_SMALL)
        u = (c / rr[:, None] + c / kk[None, :]) * s
        if APPLY:
            p = tl.load(out_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            if USE_DECAY:
                p = p * decay
            u = tl.fma(u, neg_lr, p)
        tl.store(out_ptr + offs, _out(u, out_ptr), mask=mask)
        tl.store(m_ptr + offs, _out(_lerp(m, g, w2, w2m1, W2_SMALL), m_ptr), mask=mask)


# -------------------------------------------------------------------------------------- host


def _consts(beta1: float, beta2: float) -> dict:
    # Python floats reach the kernels as float32, as torch turns a scalar weight into float32.
    w2 = 1.0 - beta2
    b1, w2f = float(torch.tensor(beta1, dtype=torch.float32)), float(torch.tensor(w2, dtype=torch.float32))
    return dict(beta1=b1, b1m1=b1 - 1.0, w2=w2f, w2m1=w2f - 1.0,
                B1_SMALL=abs(b1) < 0.5, W2_SMALL=abs(w2f) < 0.5)


def _launch_opts() -> dict:
    # On the GPU, contracting p·decay + x into one fma would round differently from torch's two
    # kernels; only the explicit tl.fma calls may fuse. (The interpreter ignores these options.)
    return dict(enable_fp_fusion=False, num_warps=NUM_WARPS)


def _check_dtype(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"the Triton kernels support float32 and bfloat16 tensors, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("the Triton kernels need contiguous tensors")


def lion_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
              lr: float, beta1: float, beta2: float, weight_decay: float, sign_scale: float = 1.0) -> None:
    """Fused :func:`leo_dist.functional.lion_update`: one kernel launch per tensor, in place.

    ``params``, ``grads``, ``exp_avgs``: paired contiguous float32/bfloat16 tensors on one device.
    """
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    k = _consts(beta1, beta2)
    use_decay, decay = decay_args(lr, weight_decay)
    for p, g, m in zip(params, grads, exp_avgs):
        _check_dtype(p, g, m)
        n = p.numel()
        if n == 0:
            continue
        _lion_kernel[(triton.cdiv(n, BLOCK),)](p, g, m, n, decay=decay, step=-lr * sign_scale,
                                               USE_DECAY=use_decay, BLOCK=BLOCK, **k, **_launch_opts())


def sign_shard_step_(grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int,
                     beta1: float, beta2: float) -> Tensor:
    """Fused :func:`leo_dist.local_step.sign_shard_step_` (same contract, bitwise equal)."""
    S = check_shard_args(grad, exp_avg, bits, zeros, n_valid)
    _check_dtype(grad, exp_avg)
    flag = torch.zeros(1, dtype=torch.int32, device=grad.device)
    if S:
        n_bytes = S // 8
        bytes_per_prog = BLOCK // 8
        _sign_shard_kernel[(triton.cdiv(n_bytes, bytes_per_prog),)](
            grad, exp_avg, bits, zeros, flag, n_bytes, n_valid, BYTES=bytes_per_prog,
            **_consts(beta1, beta2), **_launch_opts())
    return flag.to(torch.uint8).reshape(())


def apply_signs_(param: Tensor, bits: Tensor, zeros: Tensor | None, lr: float, weight_decay: float,
                 scale: float) -> None:
    """Fused :func:`leo_dist.local_step.apply_signs_`: ``param`` modified in place."""
    check_apply_args(param, bits, zeros)
    _check_dtype(param)
    n = param.numel()
    if n == 0:
        return
    use_decay, decay = decay_args(lr, weight_decay)
    bytes_per_prog = BLOCK // 8
    _apply_signs_kernel[(triton.cdiv(triton.cdiv(n, 8), bytes_per_prog),)](
        param, bits, zeros if zeros is not None else bits, n, decay, -lr * scale,
        HAS_ZEROS=zeros is not None, USE_DECAY=use_decay, BYTES=bytes_per_prog, **_launch_opts())


def _rows(start: int, end: int, n_cols: int) -> tuple[int, int]:
    if n_cols <= 0 or not 0 <= start < end:
        raise ValueError(f"need n_cols > 0 and 0 <= start < end, got n_cols={n_cols}, [{start}, {end})")
    return start // n_cols, (end - 1) // n_cols + 1


def _grid2d(r0: int, r1: int, n_cols: int) -> tuple[int, int]:
    return triton.cdiv(r1 - r0, ROWS_PER_PROGRAM), triton.cdiv(n_cols, TILE_C)


def _check_slice(name: str, t: Tensor, start: int, end: int) -> None:
    if t.numel() != end - start:
        raise ValueError(f"{name} must hold the {end - start} elements of [{start}, {end}), got {t.numel()}")


def leo2d_partial_sumsq(grad: Tensor, exp_avg: Tensor, start: int, end: int, n_cols: int,
                        beta1: float) -> tuple[Tensor, Tensor]:
    """Partial row and column sums of ``c²`` over the flat slice ``[start, end)`` of an (R, C) matrix.

    ``grad``, ``exp_avg``: the slice's ``end − start`` elements, contiguous, float32/bfloat16; read
    only. Returns ``(row_sq, col_sq)``, new float32 tensors: ``row_sq[i]`` for matrix row
    ``start // C + i`` (``(end−1)//C − start//C + 1`` rows) and ``col_sq[j]`` for column ``j`` (C),
    each summing only the slice's elements. Summed over all slices of a matrix (an all-reduce),
    their square roots are Leo's row and column norms. Deterministic (no atomics).
    """
    _check_dtype(grad, exp_avg)
    _check_slice("grad", grad, start, end)
    _check_slice("exp_avg", exp_avg, start, end)
    r0, r1 = _rows(start, end, n_cols)
    grid = _grid2d(r0, r1, n_cols)
    row_part = torch.empty(grid[1], r1 - r0, dtype=torch.float32, device=grad.device)
    col_part = torch.empty(grid[0], n_cols, dtype=torch.float32, device=grad.device)
    k = _consts(beta1, 0.5)
    _leo2d_sumsq_kernel[grid](grad, exp_avg, row_part, col_part, start, end, n_cols, r0, r1,
                              k["beta1"], k["b1m1"], B1_SMALL=k["B1_SMALL"], TILE_R=TILE_R, TILE_C=TILE_C,
                              ROWS=ROWS_PER_PROGRAM, **_launch_opts())
    return row_part.sum(0), col_part.sum(0)


def leo2d_partial_usq(grad: Tensor, exp_avg: Tensor, start: int, end: int, n_cols: int, beta1: float,
                      row_norm_eps: Tensor, col_norm_eps: Tensor) -> Tensor:
    """``Σu²`` over the slice, ``u = c/row_norm_eps[row] + c/col_norm_eps[col]``; a 0-d float32 tensor.

    ``row_norm_eps``: float32, one entry per row the slice touches (as :func:`leo2d_partial_sumsq`),
    the full row norm plus eps; ``col_norm_eps``: float32 (C,), full column norms plus eps.
    """
    _check_dtype(grad, exp_avg)
    r0, r1 = _rows(start, end, n_cols)
    grid = _grid2d(r0, r1, n_cols)
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=grad.device)
    k = _consts(beta1, 0.5)
    _leo2d_usq_kernel[grid](grad, exp_avg, row_norm_eps.float().contiguous(), col_norm_eps.float().contiguous(),
                            part, start, end, n_cols, r0, r1, k["beta1"], k["b1m1"], B1_SMALL=k["B1_SMALL"],
                            TILE_R=TILE_R, TILE_C=TILE_C, ROWS=ROWS_PER_PROGRAM, **_launch_opts())
    return part.sum()


def leo2d_update_(grad: Tensor, exp_avg: Tensor, start: int, end: int, n_cols: int, beta1: float, beta2: float,
                  row_norm_eps: Tensor, col_norm_eps: Tensor, scale: Tensor | float, *,
                  out: Tensor | None = None, param: Tensor | None = None, lr: float = 0.0,
                  weight_decay: float = 0.0) -> None:
    """Last pass of Leo's 2-D rule over the slice; ``exp_avg`` updated in place.

    Exactly one of ``out`` (written with ``scale·u`` in its dtype: the update to all-gather) or
    ``param`` (the slice of the parameter, updated in place: ``p·(1−lr·wd) − lr·scale·u``). ``scale``
    is Leo's ``s`` as a float or a 0-d tensor on the device (no host synchronisation).
    """
    if (out is None) == (param is None):
        raise ValueError("pass exactly one of out= and param=")
    target = out if out is not None else param
    _check_dtype(grad, exp_avg, target)
    _check_slice("out/param", target, start, end)
    r0, r1 = _rows(start, end, n_cols)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(scale, dtype=torch.float32, device=grad.device)
    use_decay, decay = decay_args(lr, weight_decay)
    _leo2d_update_kernel[_grid2d(r0, r1, n_cols)](
        grad, exp_avg, row_norm_eps.float().contiguous(), col_norm_eps.float().contiguous(),
        scale.float().reshape(1), target, start, end, n_cols, r0, r1,
        decay=decay, neg_lr=-lr, APPLY=param is not None, USE_DECAY=use_decay,
        TILE_R=TILE_R, TILE_C=TILE_C, ROWS=ROWS_PER_PROGRAM, **_consts(beta1, beta2), **_launch_opts())


def leo_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
             lr: float, beta1: float, beta2: float, weight_decay: float, align_const: float, eps: float,
             orthogonalize: bool = True) -> None:
    """Fused :func:`leo_dist.functional.leo_update`, in place.

    Sign-rule parameters: one pass each (:func:`lion_step` with ``sign_scale=align_const``). Each
    2-D parameter: three passes (norms, ``Σu²``, update); the scale stays on the device.
    """
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    is_mat = [orthogonalize and p.ndim == 2 for p in params]
    vec = [i for i, m in enumerate(is_mat) if not m]
    if vec:
        lion_step([params[i] for i in vec], [grads[i] for i in vec], [exp_avgs[i] for i in vec], lr=lr,
                  beta1=beta1, beta2=beta2, weight_decay=weight_decay, sign_scale=align_const)
    for p, g, m, mat in zip(params, grads, exp_avgs, is_mat):
        if not mat or p.numel() == 0:
            continue
        R, C = p.shape
        row_sq, col_sq = leo2d_partial_sumsq(g, m, 0, R * C, C, beta1)
        rr = row_sq.sqrt_().add_(eps)
        kk = col_sq.sqrt_().add_(eps)
        usq = leo2d_partial_usq(g, m, 0, R * C, C, beta1, rr, kk)
        s = leo_scale(usq, R * C, align_const, eps)
        leo2d_update_(g, m, 0, R * C, C, beta1, beta2, rr, kk, s, param=p, lr=lr, weight_decay=weight_decay)


# Ahead-of-time builds (sm_80/sm_90 cubins, PTX byte counts) live in kernels_aot.py; re-exported here.
from .kernels_aot import AOT_KERNELS, _aot_specs, aot_compile, ptx_global_bytes  # noqa: E402,F401
