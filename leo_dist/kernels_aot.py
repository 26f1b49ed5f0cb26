"""Ahead-of-time builds of the Triton kernels of :mod:`leo_dist.kernels` for sm_80 and sm_90.

``aot_compile(name, arch, dtype)`` compiles one kernel to PTX and a cubin without a GPU (Triton's
wheel ships ptxas), so the tests check on a CPU machine that the kernels build for the GPUs users
run and that their loads vectorise; ``ptx_global_bytes`` counts the bytes each thread loads and
stores, read from the PTX. Imports Triton (through :mod:`leo_dist.kernels`).
"""
from __future__ import annotations

import re

import triton

from .kernels import (BLOCK, NUM_WARPS, ROWS_PER_PROGRAM, TILE_C, TILE_R, _apply_signs_kernel, _leo2d_sumsq_kernel,
                      _leo2d_update_kernel, _leo2d_usq_kernel, _lion_kernel, _sign_shard_kernel)

__all__ = ["aot_compile", "ptx_global_bytes"]


def _aot_specs(dt: str) -> dict:
    """Per kernel: (argument types, constexpr values, arguments assumed 16-divisible).

    The divisibility hints are what Triton's launcher infers by itself for 16-aligned tensors and
    sizes that are multiples of 16 (the common case); they let loads become 128-bit vectors.
    """
    f = "fp32"
    common2d = dict(g_ptr=f"*{dt}", m_ptr=f"*{dt}", start="i64", end="i64", n_cols="i64", r0="i64", r1="i64",
                    beta1=f, b1m1=f)
    tile = dict(B1_SMALL=False, TILE_R=TILE_R, TILE_C=TILE_C, ROWS=ROWS_PER_PROGRAM)
    div2d = ["g_ptr", "m_ptr", "start", "end", "n_cols"]
    return {
        "lion": (_lion_kernel, dict(p_ptr=f"*{dt}", g_ptr=f"*{dt}", m_ptr=f"*{dt}", n="i64", beta1=f, b1m1=f,
                                    w2=f, w2m1=f, decay=f, step=f),
                 dict(B1_SMALL=False, W2_SMALL=True, USE_DECAY=True, BLOCK=BLOCK), ["p_ptr", "g_ptr", "m_ptr", "n"]),
        "sign_shard": (_sign_shard_kernel, dict(g_ptr=f"*{dt}", m_ptr=f"*{dt}", bits_ptr="*u8", zeros_ptr="*u8",
                                                flag_ptr="*i32", n_bytes="i64", n_valid="i64", beta1=f, b1m1=f,
                                                w2=f, w2m1=f),
                       dict(B1_SMALL=False, W2_SMALL=True, BYTES=BLOCK // 8),
                       ["g_ptr", "m_ptr", "bits_ptr", "zeros_ptr", "n_bytes"]),
        "apply_signs": (_apply_signs_kernel, dict(p_ptr=f"*{dt}", bits_ptr="*u8", zeros_ptr="*u8", n="i64",
                                                  decay=f, step=f),
                        dict(HAS_ZEROS=True, USE_DECAY=True, BYTES=BLOCK // 8), ["p_ptr", "bits_ptr", "zeros_ptr", "n"]),
        "leo2d_sumsq": (_leo2d_sumsq_kernel, dict(common2d, row_part_ptr="*fp32", col_part_ptr="*fp32"), tile,
                        div2d + ["row_part_ptr", "col_part_ptr"]),
        "leo2d_usq": (_leo2d_usq_kernel, dict(common2d, rr_ptr="*fp32", kk_ptr="*fp32", part_ptr="*fp32"), tile,
                      div2d + ["rr_ptr", "kk_ptr"]),
        "leo2d_update": (_leo2d_update_kernel, dict(common2d, rr_ptr="*fp32", kk_ptr="*fp32", scale_ptr="*fp32",
                                                    out_ptr=f"*{dt}", w2=f, w2m1=f, decay=f, neg_lr=f),
                         dict(tile, W2_SMALL=True, APPLY=True, USE_DECAY=True),
                         div2d + ["rr_ptr", "kk_ptr", "out_ptr"]),
    }


AOT_KERNELS = ("lion", "sign_shard", "apply_signs", "leo2d_sumsq", "leo2d_usq", "leo2d_update")


def aot_compile(name: str, arch: int, dtype: str = "fp32"):
    """Compile kernel ``name`` (one of :data:`AOT_KERNELS`) for CUDA ``sm_<arch>`` without a GPU.

    ``dtype``: ``"fp32"`` or ``"bf16"`` for the parameter, gradient and momentum tensors. Returns
    Triton's ``CompiledKernel``; ``.asm`` holds ``"ttir"``, ``"llir"``, ``"ptx"`` and, when the
    ``ptxas`` shipped in Triton's wheel runs, ``"cubin"``. Needs the kernels as JIT functions, so
    it fails under ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, types, consts, divisible = _aot_specs(dtype)[name]
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("aot_compile needs JIT kernels: import leo_dist.kernels without TRITON_INTERPRET=1")
    names = fn.arg_names
    signature = {a: "constexpr" if a in consts else types[a] for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(enable_fp_fusion=False, num_warps=NUM_WARPS))


_PTX_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "b32": 4, "u32": 4, "f32": 4, "b64": 8, "u64": 8}


def ptx_global_bytes(ptx: str) -> tuple[int, int]:
    """Bytes one thread loads and stores through global memory, summed over the PTX's ``ld.global``
    and ``st.global`` instructions (vector width included; atomics left out).

    Exact for straight-line kernels (the flat ones); for a kernel with a loop it counts one trip.
    """
    load = store = 0
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        parts = mods.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = next((_PTX_WIDTH[p] for p in reversed(parts) if p in _PTX_WIDTH), 0)
        if op == "ld":
            load += vec * width
        else:
            store += vec * width
    return load, store
