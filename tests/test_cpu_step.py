"""The one-pass C back end (leo_dist.cpu_step) against the torch reference.

Sign paths (bits, zero bitmaps, momentum, sign-rule parameters) must be bitwise equal; Leo's 2-D
parameters equal to float rounding. Sizes are chosen around the C code's boundaries: bytes (8),
vector width (8 floats), thread chunks (64), and the 65536-element threading threshold
(tests/shapes.py holds the tables shared with the Triton tests). The C source itself must build
clean with -Wall -Wextra -Werror, and the cache must key builds by source, flags and compiler.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import warnings

import pytest
import torch
from shapes import (C_SIZES, DTYPE_MIXES, DTYPES, LEO_SHAPES, LEO_SHAPES_LARGE, LION_HYPERS, OPTIMIZER_SHAPES,
                    leo_inputs, lion_inputs, rand_with_zeros, random_signs)

from leo_dist import Leo, Lion, cpu_step, local_step
from leo_dist import functional as F

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine: the fast CPU path falls back to torch")


def test_builds():
    assert cpu_step.available(), cpu_step.build_info()
    info = cpu_step.build_info()
    assert "path" in info and "error" not in info


@pytest.mark.parametrize("fma", [False, True])
def test_c_source_compiles_without_warnings(fma, tmp_path):
    """The packaged C source, with the compiler and flags cpu_step builds it with, plus -Wall -Wextra -Werror."""
    assert os.path.isfile(cpu_step.SOURCE), cpu_step.SOURCE
    if fma and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the FMA build adds -mavx2 -mfma, which target x86-64, not {platform.machine()}")
    try:
        cc = cpu_step._compiler()
    except RuntimeError as exc:
        pytest.skip(f"no C compiler: {exc}")
    cmd = [cc, *cpu_step._flags(fma), "-Wall", "-Wextra", "-Werror", cpu_step.SOURCE, "-o", str(tmp_path / "t.so"),
           "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"


def test_cache_name_hashes_source_flags_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LEO_DIST_CACHE_DIR", str(tmp_path))
    cc = cpu_step._compiler()
    base = cpu_step._library_path("int f(void);", cc, ["-O3"])
    assert os.path.dirname(base) == str(tmp_path)
    assert cpu_step._library_path("int f(void);", cc, ["-O3"]) == base
    assert cpu_step._library_path("int g(void);", cc, ["-O3"]) != base
    assert cpu_step._library_path("int f(void);", cc, ["-O2"]) != base
    # another compiler: same program, other executable name (its --version text is hashed too)
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho fake-cc 1.0\n")
    fake.chmod(0o755)
    assert cpu_step._library_path("int f(void);", str(fake), ["-O3"]) != base


@pytest.mark.parametrize("pdt,gdt,mdt", DTYPE_MIXES)
@pytest.mark.parametrize("wd,beta1", LION_HYPERS)
def test_lion_step_bitwise(pdt, gdt, mdt, wd, beta1):
    params, grads, moms = lion_inputs(C_SIZES, pdt, gdt, mdt, seed=1)
    ref_p, ref_m = [p.clone() for p in params], [m.clone() for m in moms]
    kw = dict(lr=0.01, beta1=beta1, beta2=0.99, weight_decay=wd, sign_scale=0.7)
    for _ in range(3):
        F.lion_update(ref_p, grads, ref_m, **kw)
        cpu_step.lion_step_(params, grads, moms, **kw)
    for a, b in zip(params + moms, ref_p + ref_m):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leo_step_matches_functional(dtype):
    params, grads, moms = leo_inputs(LEO_SHAPES + LEO_SHAPES_LARGE, dtype, seed=2)
    ref_p, ref_m = [p.clone() for p in params], [m.clone() for m in moms]
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, align_const=0.2, eps=1e-8)
    for _ in range(3):
        F.leo_update(ref_p, grads, ref_m, **kw)
        cpu_step.leo_step_(params, grads, moms, **kw)
    for p, r, m, rm in zip(params, ref_p, moms, ref_m):
        if p.ndim == 2:
            # norms summed in a different order: float rounding, relative to the step size
            torch.testing.assert_close(p.float(), r.float(), rtol=1e-6, atol=1e-8)
            # the momentum does not depend on the norms
            assert torch.equal(m, rm)
        else:
            assert torch.equal(p, r) and torch.equal(m, rm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", C_SIZES)
def test_sign_shard_bitwise(dtype, n):
    gen = torch.Generator().manual_seed(n)
    S = (n + 7) // 8 * 8 + 8  # padding past n_valid, as a bucket's last shard has
    g, m = rand_with_zeros(S, dtype, gen, 3), rand_with_zeros(S, dtype, gen, 3)
    m2 = m.clone()
    bits = [torch.full((S // 8,), 0xAA, dtype=torch.uint8) for _ in range(4)]
    f1 = local_step._sign_shard_step_torch(g, m, bits[0], bits[1], n, 0.9, 0.99)
    f2 = cpu_step.sign_shard_step_(g, m2, bits[2], bits[3], n, 0.9, 0.99)
    assert torch.equal(bits[0], bits[2]) and torch.equal(bits[1], bits[3]) and torch.equal(m, m2)
    assert f1.item() == f2.item() == 1 and f2.dtype == torch.uint8 and f2.dim() == 0


def test_sign_shard_no_zero_flag():
    g, m = torch.randn(1024) + 10, torch.randn(1024)
    b, z = torch.empty(128, dtype=torch.uint8), torch.empty(128, dtype=torch.uint8)
    assert cpu_step.sign_shard_step_(g, m, b, z, 1000, 0.9, 0.99).item() == 0
    assert int(z.sum()) == 0 and int(b[-1]) == 0  # padding sets no bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", C_SIZES)
@pytest.mark.parametrize("with_zeros", [False, True])
def test_apply_signs_bitwise(dtype, n, with_zeros):
    gen = torch.Generator().manual_seed(n + 1)
    bits, zeros = random_signs(n, with_zeros, gen)
    p = torch.randn(n, generator=gen).to(dtype)
    ref = p.clone()
    local_step._apply_signs_torch(ref, bits, zeros, 0.01, 0.1, 0.2)
    cpu_step.apply_signs_(p, bits, zeros, 0.01, 0.1, 0.2)
    assert torch.equal(p, ref)


def test_local_step_dispatches_to_c(monkeypatch):
    calls = []
    real = cpu_step.sign_shard_step_
    monkeypatch.setattr(cpu_step, "sign_shard_step_", lambda *a: calls.append(1) or real(*a))
    g, m = torch.randn(64), torch.randn(64)
    b, z = torch.empty(8, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8)
    local_step.sign_shard_step_(g, m, b, z, 64, 0.9, 0.99)
    assert calls == [1]
    # float64 is not a C-path dtype: the torch reference runs
    local_step.sign_shard_step_(g.double(), m.double(), b, z, 64, 0.9, 0.99)
    assert calls == [1]


@pytest.mark.parametrize("cls", [Lion, Leo])
def test_optimizer_cpu_path_matches_functional(cls):
    gen = torch.Generator().manual_seed(3)
    shapes = OPTIMIZER_SHAPES
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in ref]
    opt = cls(params, lr=0.01, weight_decay=0.1)
    g = opt.param_groups[0]
    for step in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
        if cls is Lion:
            F.lion_update(ref, grads, ref_m, **kw)
        else:
            F.leo_update(ref, grads, ref_m, align_const=g["align_const"], eps=g["eps"], **kw)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-8)
        if p.ndim != 2 or cls is Lion:
            assert torch.equal(p.detach(), r)


def test_validation_errors():
    g, m = torch.randn(12), torch.randn(12)
    b = torch.empty(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_step.sign_shard_step_(g, m, b, b.clone(), 12, 0.9, 0.99)
    with pytest.raises(ValueError, match="bits"):
        cpu_step.apply_signs_(torch.randn(100), b, None, 0.1, 0.0, 1.0)


def test_missing_compiler_falls_back_loudly(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_step, "_tried", False)
    monkeypatch.setattr(cpu_step, "_lib", None)
    monkeypatch.setattr(cpu_step, "_info", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LEO_DIST_CACHE_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not cpu_step.available()
    assert "error" in cpu_step.build_info()
    # the optimizer still steps, on the torch path, with the same result
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    ref, m = p.detach().clone(), torch.zeros(10)
    F.lion_update([ref], [p.grad], [m], lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every step
        Lion([p]).step()
    assert torch.equal(p.detach(), ref)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_step, "_tried", False)
    monkeypatch.setattr(cpu_step, "_lib", None)
    monkeypatch.setattr(cpu_step, "_info", {})
    monkeypatch.setenv("LEO_DIST_CPU_EXT", "0")
    assert not cpu_step.available()
    assert cpu_step.build_info().get("disabled") == "LEO_DIST_CPU_EXT=0"
