"""Fast CPU back end of the local step: one pass over memory, from a small C library.

Why C and not torch ops: a Lion step must read ``p, g, m`` and write ``p, m`` (20 bytes per fp32
element). The op-by-op torch path moves ~76 bytes (``lion_pytorch``) and the multi-tensor foreach
path ~60, because every op is a separate pass. ``torch.compile`` fuses, but costs tens of seconds
of compilation per distinct list of shapes, which a 2-core CI cannot afford. The C source,
``leo_dist/csrc/cpu_step.c`` (package data), has no torch headers, so it compiles with the system
C compiler in well under a second, once per machine, into a cache directory; it is called through
``ctypes`` (which releases the GIL) with raw data pointers, and it threads with OpenMP (sharing the
``libgomp`` torch already loaded). docs/kernels.md has the measurements behind these choices.

Exactness: the arithmetic mirrors :mod:`leo_dist.functional` and :mod:`leo_dist.local_step`
operation by operation — ``lerp`` as torch's CPU kernel computes it (one fused multiply-add on
machines where torch's vector kernels use FMA), float32 compute, one round-to-nearest-even cast to
bfloat16 — so packed bits, zero bitmaps and momentum are bitwise equal to the torch path, and
sign-rule parameters too. Leo's 2-D rule accumulates row/column sums of squares in float64 (a
different summation order from ``torch.linalg.vector_norm``) and multiplies by the reciprocals
``1/(r+eps)``, ``1/(k+eps)`` (computed once per row and column) instead of dividing per element, so
those parameters agree to float rounding (≤1e-6 relative), not bitwise; their momentum is bitwise.

Fallback: when no C compiler works (or ``LEO_DIST_CPU_EXT=0``), :func:`available` is False, a
``RuntimeWarning`` says so once, and callers use the torch path — same results, slower. Tensors
that are not CPU, not contiguous, or not float32/bfloat16 also take the torch path
(:func:`supports`).

Cache: ``$LEO_DIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/leo_dist``, else ``~/.cache/leo_dist``;
the file name hashes the source, flags and compiler, so stale builds are never reused.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "available", "supports", "lion_step_", "leo_step_", "sign_shard_step_", "apply_signs_", "build_info",
    "onebit_compress_block_", "onebit_decode_block_",
]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_step.c")
"""The C source of the library, shipped as package data."""
_CODES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_info: dict[str, str] = {}


def _torch_uses_fma() -> bool:
    # torch's AVX2/AVX512 vector kernels compute lerp with fmadd; its baseline kernels do not.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cache_dir() -> str:
    d = os.environ.get("LEO_DIST_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "leo_dist")
    return d


def _compiler() -> str:
    """The C compiler the library is built with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on PATH."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    return cc


def _flags(fma: bool | None = None) -> list[str]:
    """Compiler flags of the library; ``fma`` defaults to whether torch's own CPU kernels use FMA."""
    if fma is None:
        fma = _torch_uses_fma()
    # -ffp-contract=off: only the explicit fmaf calls may fuse, so results equal torch's bit for bit.
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
             f"-DLEO_USE_FMA={int(fma)}"]
    if fma:
        flags += ["-mavx2", "-mfma"]
    return flags


def _library_path(source: str, cc: str, flags: list[str]) -> str:
    """Cache path of the library ``cc`` builds from ``source`` with ``flags``. The name hashes all three
    (and the compiler's ``--version``), so a stale build is never reused."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source, cc, version, *flags, sys.platform]).encode()).hexdigest()[:16]
    return os.path.join(_cache_dir(), f"leo_cpu_step_{key}.so")


def _compile() -> ctypes.CDLL:
    cc, flags = _compiler(), _flags()
    with open(SOURCE, encoding="utf-8") as f:
        source = f.read()
    path = _library_path(source, cc, flags)
    cache = os.path.dirname(path)
    os.makedirs(cache, exist_ok=True)
    _info.update(compiler=cc, flags=" ".join(flags), path=path)
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            # Compile the very text that was hashed, even if the package file changes meanwhile.
            src = os.path.join(tmp, "leo_cpu_step.c")
            out = os.path.join(tmp, "leo_cpu_step.so")
            with open(src, "w", encoding="utf-8") as f:
                f.write(source)
            res = subprocess.run([cc, *flags, src, "-o", out, "-lm"], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed:\n{res.stderr[-2000:]}")
            os.replace(out, path)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(path)
    vp, i64, i32, f32, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_int
    P = ctypes.POINTER
    lib.lion_multi.argtypes = [i64, P(vp), P(vp), P(vp), P(i64), P(i32), f32, f32, i, f32, f32, i]
    lib.lion_multi.restype = None
    lib.sign_shard.argtypes = [vp, vp, vp, vp, i64, i64, i, i, f32, f32, i]
    lib.sign_shard.restype = i
    lib.apply_signs.argtypes = [vp, vp, vp, i64, i, i, f32, f32, i]
    lib.apply_signs.restype = None
    lib.leo2d_sumsq.argtypes = [vp, vp, i64, i64, i, i, f32, vp, i]
    lib.leo2d_sumsq.restype = None
    lib.leo2d_usq.argtypes = [vp, vp, i64, i64, i, i, f32, vp, vp, i]
    lib.leo2d_usq.restype = ctypes.c_double
    lib.leo2d_apply.argtypes = [vp, vp, vp, i64, i64, i, i, i, f32, f32, vp, vp, f32, i, f32, f32, i]
    lib.leo2d_apply.restype = None
    lib.onebit_compress.argtypes = [vp, i64, vp, i64, i64, i64, vp, vp, i64, i64, i64, i]
    lib.onebit_compress.restype = None
    lib.onebit_decode.argtypes = [vp, i64, i64, vp, i64, i64, i64, i64, vp, i]
    lib.onebit_decode.restype = None
    return lib


def _need() -> ctypes.CDLL:
    lib = _get()
    if lib is None:
        raise RuntimeError(f"leo_dist.cpu_step is not available ({build_info()}); check available() first")
    return lib


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("LEO_DIST_CPU_EXT", "1") == "0":
                _info["disabled"] = "LEO_DIST_CPU_EXT=0"
            else:
                try:
                    _lib = _compile()
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    _info["error"] = str(e)
                    warnings.warn(f"leo_dist: the fast CPU step could not be built ({e}); using the slower "
                                  "torch path (same results). Install a C compiler to enable it.",
                                  RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


def available() -> bool:
    """True when the C library is built and loaded (building it on first call, ~0.5 s)."""
    return _get() is not None


def build_info() -> dict[str, str]:
    """Compiler, flags and path of the built library, or the reason it is not available."""
    _get()
    return dict(_info)


def supports(*tensors: Tensor) -> bool:
    """True when every tensor is a contiguous CPU float32/bfloat16 tensor (what the C code reads)."""
    return all(t.device.type == "cpu" and t.dtype in _CODES and t.is_contiguous() for t in tensors)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


def decay_args(lr: float, weight_decay: float) -> tuple[bool, float]:
    """``(use_decay, 1 - lr*weight_decay)`` of a decoupled-decay step; shared by the C and Triton back ends."""
    return (True, 1.0 - lr * weight_decay) if weight_decay != 0.0 else (False, 1.0)


def lion_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
               lr: float, beta1: float, beta2: float, weight_decay: float, sign_scale: float = 1.0) -> None:
    """One Lion (or Leo sign-rule, ``sign_scale=align``) step over paired lists, in one pass.

    Same contract as :func:`leo_dist.functional.lion_update`; ``params`` and ``exp_avgs`` are
    modified in place. Every tensor must satisfy :func:`supports`; call only when :func:`available`.
    """
    lib = _need()
    n = len(params)
    if n == 0:
        return
    if not (len(grads) == n == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    ptrs = (ctypes.c_void_p * n)
    ps, gs, ms = ptrs(*[t.data_ptr() for t in params]), ptrs(*[t.data_ptr() for t in grads]), \
        ptrs(*[t.data_ptr() for t in exp_avgs])
    sizes = (ctypes.c_int64 * n)(*[t.numel() for t in params])
    for p, g, m in zip(params, grads, exp_avgs):
        if g.numel() != p.numel() or m.numel() != p.numel():
            raise ValueError("each grad and exp_avg must have as many elements as its parameter")
    codes = (ctypes.c_int32 * (3 * n))(*[_CODES[t.dtype] for trio in zip(params, grads, exp_avgs) for t in trio])
    use_decay, decay = decay_args(lr, weight_decay)
    lib.lion_multi(n, ps, gs, ms, sizes, codes, beta1, 1.0 - beta2, use_decay, decay, -lr * sign_scale, _nthreads())


def _leo2d_(p: Tensor, g: Tensor, m: Tensor, *, lr: float, beta1: float, beta2: float, weight_decay: float,
            align_const: float, eps: float) -> None:
    lib = _need()
    R, C = p.shape
    nt = _nthreads()
    gc, mc, pc = _CODES[g.dtype], _CODES[m.dtype], _CODES[p.dtype]
    acc = torch.zeros(nt, R + C, dtype=torch.float64)
    lib.leo2d_sumsq(g.data_ptr(), m.data_ptr(), R, C, gc, mc, beta1, acc.data_ptr(), nt)
    norms = acc[0].sqrt().float()
    # Reciprocals once per matrix, so that the passes multiply instead of dividing per element.
    inv = norms.add_(eps).reciprocal_()
    ir, ik = inv[:R], inv[R:]
    usq = lib.leo2d_usq(g.data_ptr(), m.data_ptr(), R, C, gc, mc, beta1, ir.data_ptr(), ik.data_ptr(), nt)
    # The scale in float32, as the reference computes it from a float32 sum.
    s = align_const / (torch.tensor(usq, dtype=torch.float32).div(R * C).add(eps).sqrt().add(eps))
    use_decay, decay = decay_args(lr, weight_decay)
    lib.leo2d_apply(p.data_ptr(), g.data_ptr(), m.data_ptr(), R, C, pc, gc, mc, beta1, 1.0 - beta2,
                    ir.data_ptr(), ik.data_ptr(), float(s), use_decay, decay, -lr, nt)


def leo_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
              lr: float, beta1: float, beta2: float, weight_decay: float, align_const: float, eps: float,
              orthogonalize: bool = True) -> None:
    """One Leo step, same contract as :func:`leo_dist.functional.leo_update`, in place.

    Sign-rule parameters take one pass (20 B/element fp32); each 2-D parameter three passes over
    ``g, m`` (row/column sums of squares; Σu²; the update), 36 B/element, with no scratch matrix.
    """
    mat = [i for i, p in enumerate(params) if orthogonalize and p.ndim == 2 and p.numel() > 0]
    vec = [i for i, p in enumerate(params) if not (orthogonalize and p.ndim == 2)]
    if vec:
        lion_step_([params[i] for i in vec], [grads[i] for i in vec], [exp_avgs[i] for i in vec],
                   lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, sign_scale=align_const)
    for i in mat:
        _leo2d_(params[i], grads[i], exp_avgs[i], lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                align_const=align_const, eps=eps)


def sign_shard_step_(grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int,
                     beta1: float, beta2: float) -> Tensor:
    """C version of :func:`leo_dist.local_step.sign_shard_step_` (same contract, bitwise equal)."""
    lib = _need()
    S = check_shard_args(grad, exp_avg, bits, zeros, n_valid)
    any_zero = lib.sign_shard(grad.data_ptr(), exp_avg.data_ptr(), bits.data_ptr(), zeros.data_ptr(), S,
                              n_valid, _CODES[grad.dtype], _CODES[exp_avg.dtype], beta1, 1.0 - beta2, _nthreads())
    return torch.tensor(any_zero, dtype=torch.uint8)


def check_shard_args(grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int) -> int:
    """Validate the arguments of a ``sign_shard_step_`` back end; returns the shard size ``S``."""
    S = grad.numel()
    if exp_avg.numel() != S or S % 8:
        raise ValueError(f"grad and exp_avg must have the same size, a multiple of 8; got {S} and {exp_avg.numel()}")
    for name, t in (("bits", bits), ("zeros", zeros)):
        if t.dtype != torch.uint8 or t.numel() != S // 8 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous uint8 tensor of {S // 8} bytes")
    if not 0 <= n_valid <= S:
        raise ValueError(f"n_valid must be in [0, {S}], got {n_valid}")
    return S


def check_apply_args(param: Tensor, bits: Tensor, zeros: Tensor | None) -> None:
    """Validate the arguments of an ``apply_signs_`` back end."""
    nb = (param.numel() + 7) // 8
    for name, t in (("bits", bits), ("zeros", zeros)):
        if t is not None and (t.dtype != torch.uint8 or t.numel() < nb or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous uint8 tensor of at least {nb} bytes")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous")


def apply_signs_(param: Tensor, bits: Tensor, zeros: Tensor | None, lr: float, weight_decay: float,
                 scale: float) -> None:
    """C version of :func:`leo_dist.local_step.apply_signs_` (same contract)."""
    lib = _need()
    check_apply_args(param, bits, zeros)
    use_decay, decay = decay_args(lr, weight_decay)
    lib.apply_signs(param.data_ptr(), bits.data_ptr(), zeros.data_ptr() if zeros is not None else None,
                    param.numel(), _CODES[param.dtype], use_decay, decay, -lr * scale, _nthreads())


def onebit_compress_block_(x: Tensor, err: Tensor, nvalid: Sequence[int], out: Tensor, bits_off: int,
                           scales_off: int) -> None:
    """One streamed block of :func:`leo_dist.onebit.compress_grad_stream_`, in one pass.

    ``x``: float32 ``(W, c)`` with unit column stride (the filled local gradient; scratch: left
    holding x + err); ``err``:
    float32 ``(W, c)`` view of the error buffer, unit column stride (updated in place); ``nvalid``:
    per row, the columns that belong to parameters; ``out``: the uint8 ``(W, payload)`` message
    table, contiguous: row r's bits are written at byte ``bits_off`` on, its scales (float32, one
    per 1024 columns) at byte ``scales_off`` on. ``c`` must be a multiple of 8. Same bits as the
    torch path; the scales are summed in float64 (torch sums in float32), so they and the error
    buffer agree with it to float32 rounding, not bitwise.
    """
    lib = _need()
    world, c = x.shape
    if c % 8 or x.stride(1) != 1 or err.stride(1) != 1 or not out.is_contiguous():
        raise ValueError("onebit_compress_block_: c must be a multiple of 8 and the rows contiguous")
    nv = (ctypes.c_int64 * world)(*nvalid)
    lib.onebit_compress(x.data_ptr(), x.stride(0), err.data_ptr(), err.stride(0), world, c, nv, out.data_ptr(),
                        out.stride(0), bits_off, scales_off, _nthreads())


def onebit_decode_block_(recv: Tensor, bits_off: int, scales: Tensor, k0: int, out: Tensor) -> None:
    """One block of :func:`leo_dist.onebit.decode_grad`, already divided by W: ``out`` (float32
    ``[c]``, contiguous) ← the rank-order sum of the W messages' ``±scale``, over W. ``recv``: the
    uint8 ``(W, payload)`` table (contiguous), bits of the block from byte ``bits_off``; ``scales``:
    float32 ``(W, runs)`` contiguous, the block's first run at column ``k0``. Bitwise equal to the
    torch path."""
    lib = _need()
    world = recv.shape[0]
    c = out.numel()
    if c % 8 or not (recv.is_contiguous() and scales.is_contiguous() and out.is_contiguous()):
        raise ValueError("onebit_decode_block_: c must be a multiple of 8 and the tensors contiguous")
    lib.onebit_decode(recv.data_ptr(), recv.stride(0), bits_off, scales.data_ptr(), scales.stride(0), k0, world, c,
                      out.data_ptr(), _nthreads())
