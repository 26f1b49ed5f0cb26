"""Inputs shared by the local-step back-end tests: tests/test_cpu_step.py (C) and tests/test_kernels.py (Triton).

Both back ends are checked against the torch reference on the same kinds of input. What differs
between them is where their boundaries are, so the size tables are per back end and say which
boundaries they straddle; dtypes, hyperparameters, Leo shapes and the input builders are common.
"""
from __future__ import annotations

from typing import Sequence

import torch

DTYPES = [torch.float32, torch.bfloat16]
# (param, grad, momentum) dtypes: every uniform case, and the mixed ones that bf16 training uses.
DTYPE_MIXES = [(d,) * 3 for d in DTYPES] + [(torch.bfloat16, torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16, torch.float32)]
# (weight_decay, beta1): no decay; decay; beta1 < 0.5, which takes lerp's other formula.
LION_HYPERS = [(0.0, 0.9), (0.1, 0.9), (0.1, 0.3)]

# C (leo_dist/csrc/cpu_step.c): bytes (8), vector width (8 floats), thread chunks (64) and the
# 65536-element threading threshold.
C_SIZES = [1, 7, 8, 13, 64, 1000, 65536 + 77, 200_003]

# Triton: the block (2048 elements, 256 bytes) and byte boundaries; small, since the interpreter
# runs a program per Python loop iteration.
TRITON_BLOCK = 2048
TRITON_SIZES = [1, 13, TRITON_BLOCK + 3, TRITON_BLOCK + 5]
# (n_valid, S) of a shard: padding inside the last byte, a whole padding byte, past a block.
TRITON_SHARDS = [(5, 8), (13, 24), (TRITON_BLOCK + 3, TRITON_BLOCK + 16)]

# Leo: matrices (the 2-D rule) and other shapes (the sign rule). (17, 130) spans two of the Triton
# 2-D tiles' columns (16×128) and (131, 3) two row programs (128 rows each); 1×N and N×1 are the
# degenerate norms; (300, 301) takes the C code's threaded passes.
LEO_SHAPES = [(3, 5), (17, 130), (131, 3), (13,), (2, 3, 4)]
LEO_SHAPES_LARGE = [(37, 129), (300, 301), (1, 1000), (1000, 1), (17,)]
# Whole-optimizer runs: a matrix, a vector and a 3-D tensor per back end.
OPTIMIZER_SHAPES = [(9, 20), (33, 65), (33,), (129,), (2, 3, 4), (4, 4, 4)]


def rand_with_zeros(n: int, dtype: torch.dtype, gen: torch.Generator, zero_every: int = 5) -> torch.Tensor:
    """Normal values with every ``zero_every``-th one exactly 0: where grad and momentum are both
    0, ``c`` is exactly 0 and ``sign(0) = 0`` must hold."""
    x = torch.randn(n, generator=gen)
    x[::zero_every] = 0
    return x.to(dtype)


def lion_inputs(sizes: Sequence[int], pdt: torch.dtype, gdt: torch.dtype, mdt: torch.dtype, seed: int):
    """``params, grads, moms`` for a sign-rule step, grads and momenta with exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
    grads = [rand_with_zeros(n, gdt, gen) for n in sizes]
    moms = [rand_with_zeros(n, mdt, gen) for n in sizes]
    return params, grads, moms


def leo_inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int):
    """``params, grads, moms`` of the given shapes for a Leo step."""
    gen = torch.Generator().manual_seed(seed)
    return tuple([torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3))


def random_signs(n: int, with_zeros: bool, gen: torch.Generator):
    """``bits, zeros`` for ``n`` elements: random packed bits and, if asked, a zero bitmap with about
    a quarter of its bits set (so that +1, -1 and 0 all occur)."""
    nb = (n + 7) // 8

    def rand_bytes():
        return torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=gen)
    bits = rand_bytes()
    zeros = rand_bytes() & rand_bytes() if with_zeros else None
    return bits, zeros
