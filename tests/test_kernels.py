"""Triton kernels: parity with the torch path under the interpreter, and ahead-of-time CUDA builds.

* Interpreter tests (``TRITON_INTERPRET=1``, CPU tensors): packed bits, zero bitmaps, momentum and
  sign-rule parameters bitwise equal to the torch reference; Leo 2-D parameters ≤1e-6 relative.
  Sizes straddle the block (2048 elements, 256 bytes), the 2-D tile (16×128, 128 rows a program)
  and byte boundaries, and stay small: the interpreter runs a program per Python loop iteration.
  The tables are in tests/shapes.py, shared with the C back end's tests.
* AOT tests: every kernel compiles for sm_80 and sm_90 with no GPU (Triton ships ``ptxas``), and
  the PTX loads the element streams with 128-bit vector loads.

The interpreter decides at ``@triton.jit`` time, so the interpreted module and the JIT module are
two imports of leo_dist/kernels.py, each made under its own setting of the variable.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from shapes import (DTYPES, LEO_SHAPES, LION_HYPERS, OPTIMIZER_SHAPES, TRITON_BLOCK, TRITON_SHARDS, TRITON_SIZES,
                    leo_inputs, lion_inputs, rand_with_zeros, random_signs)

# Triton wraps its own library functions (tl.sum, tl.max) for the interpreter when it is first
# imported, so the variable must be set before that import. It is removed right after, so that the
# rest of the suite sees the ordinary setting (fused=True on CPU tensors is refused without it).
_saved_env = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
finally:
    if _saved_env is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_env

import leo_dist  # noqa: E402
from leo_dist import functional as F  # noqa: E402
from leo_dist import local_step  # noqa: E402



@pytest.fixture(scope="module")
def _interpreted_kernels():
    """leo_dist.kernels imported under TRITON_INTERPRET=1; the previous import is put back after."""
    if type(triton.language.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; "
                    "run tests/test_kernels.py in its own process (or with TRITON_INTERPRET=1)")
    saved_mod = sys.modules.pop("leo_dist.kernels", None)
    saved_attr = leo_dist.__dict__.pop("kernels", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mod = importlib.import_module("leo_dist.kernels")
    assert type(mod._lion_kernel).__name__ == "InterpretedFunction"
    try:
        yield mod
    finally:
        sys.modules.pop("leo_dist.kernels", None)
        leo_dist.__dict__.pop("kernels", None)
        if saved_mod is not None:
            sys.modules["leo_dist.kernels"] = saved_mod
        if saved_attr is not None:
            leo_dist.kernels = saved_attr


@pytest.fixture
def K(_interpreted_kernels, monkeypatch):
    """The interpreted kernels, with TRITON_INTERPRET=1 for the test (Triton imports more lazily)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _interpreted_kernels


# ----------------------------------------------------------------------------- interpreter


def test_size_tables_straddle_the_kernels_block(K):
    assert K.BLOCK == TRITON_BLOCK  # tests/shapes.py's sizes are chosen around it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,beta1", LION_HYPERS)
def test_lion_step_bitwise(K, dtype, wd, beta1):
    params, grads, moms = lion_inputs(TRITON_SIZES, dtype, dtype, dtype, seed=0)
    ref_p, ref_m = [p.clone() for p in params], [m.clone() for m in moms]
    kw = dict(lr=0.01, beta1=beta1, beta2=0.99, weight_decay=wd, sign_scale=0.5)
    for _ in range(2):
        F.lion_update(ref_p, grads, ref_m, **kw)
        K.lion_step(params, grads, moms, **kw)
    for a, b in zip(params + moms, ref_p + ref_m):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_valid,S", TRITON_SHARDS)
def test_sign_shard_bitwise(K, dtype, n_valid, S):
    gen = torch.Generator().manual_seed(S)
    g, m = rand_with_zeros(S, dtype, gen, 3), rand_with_zeros(S, dtype, gen, 3)
    m2 = m.clone()
    b = [torch.full((S // 8,), 0x55, dtype=torch.uint8) for _ in range(4)]
    f1 = local_step._sign_shard_step_torch(g, m, b[0], b[1], n_valid, 0.9, 0.99)
    f2 = K.sign_shard_step_(g, m2, b[2], b[3], n_valid, 0.9, 0.99)
    assert torch.equal(b[0], b[2]) and torch.equal(b[1], b[3]) and torch.equal(m, m2)
    assert f1.item() == f2.item() == 1 and f2.dtype == torch.uint8 and f2.dim() == 0


def test_sign_shard_flag_clear(K):
    g, m = torch.rand(64) + 1, torch.rand(64)  # c > 0 everywhere
    b, z = torch.empty(8, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8)
    assert K.sign_shard_step_(g, m, b, z, 60, 0.9, 0.99).item() == 0
    assert int(z.sum()) == 0 and int(b[-1]) == 0x0F  # elements 60..63 are padding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", TRITON_SIZES)
@pytest.mark.parametrize("with_zeros", [False, True])
def test_apply_signs_bitwise(K, dtype, n, with_zeros):
    gen = torch.Generator().manual_seed(n)
    bits, zeros = random_signs(n, with_zeros, gen)
    p = torch.randn(n, generator=gen).to(dtype)
    ref = p.clone()
    local_step._apply_signs_torch(ref, bits, zeros, 0.01, 0.1, 0.2)
    K.apply_signs_(p, bits, zeros, 0.01, 0.1, 0.2)
    assert torch.equal(p, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leo_step_matches_functional(K, dtype):
    params, grads, moms = leo_inputs(LEO_SHAPES, dtype, seed=1)
    ref_p, ref_m = [p.clone() for p in params], [m.clone() for m in moms]
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, align_const=0.2, eps=1e-8)
    F.leo_update(ref_p, grads, ref_m, **kw)
    K.leo_step(params, grads, moms, **kw)
    for p, r, m, rm in zip(params, ref_p, moms, ref_m):
        assert torch.equal(m, rm)
        if p.ndim == 2:
            torch.testing.assert_close(p.float(), r.float(), rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(p, r)


@pytest.mark.parametrize("cuts", [(0, 19 * 37), (0, 50, 400, 19 * 37), (0, 37, 38, 700, 19 * 37)])
def test_leo2d_slices_match_whole_matrix(K, cuts):
    """Slices cut anywhere (inside rows, one element long) give the unsharded norms and update."""
    gen = torch.Generator().manual_seed(2)
    R, C = 19, 37
    g, m = torch.randn(R, C, generator=gen), torch.randn(R, C, generator=gen)
    c = F.interpolate(m, g, 0.9)
    row_ref = c.square().sum(1)
    col_ref = c.square().sum(0)
    rows = torch.zeros(R)
    cols = torch.zeros(C)
    slices = list(zip(cuts[:-1], cuts[1:]))
    for a, b in slices:
        rs, cs = K.leo2d_partial_sumsq(g.view(-1)[a:b], m.view(-1)[a:b], a, b, C, 0.9)
        assert rs.numel() == (b - 1) // C - a // C + 1 and cs.numel() == C
        rows[a // C:(b - 1) // C + 1] += rs
        cols += cs
    torch.testing.assert_close(rows, row_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(cols, col_ref, rtol=1e-6, atol=0)
    rr, kk = rows.sqrt() + 1e-8, cols.sqrt() + 1e-8
    usq = sum(K.leo2d_partial_usq(g.view(-1)[a:b], m.view(-1)[a:b], a, b, C, 0.9, rr[a // C:(b - 1) // C + 1], kk)
              for a, b in slices)
    u_ref = F.leo_direction(c, 1e-8)
    torch.testing.assert_close(usq, u_ref.square().sum(), rtol=1e-6, atol=0)
    s = F.leo_scale(usq, R * C, 0.2, 1e-8)
    out = torch.empty(R * C)
    m2 = m.clone().view(-1)
    for a, b in slices:
        K.leo2d_update_(g.view(-1)[a:b], m2[a:b], a, b, C, 0.9, 0.99, rr[a // C:(b - 1) // C + 1], kk, s,
                        out=out[a:b])
    torch.testing.assert_close(out.view(R, C), u_ref * s, rtol=1e-6, atol=1e-9)
    m_ref = m.clone()
    F.update_momentum_(m_ref, g, 0.99)
    assert torch.equal(m2.view(R, C), m_ref)


@pytest.mark.parametrize("cls", ["Lion", "Leo"])
def test_optimizer_fused_matches_unfused(K, cls):
    gen = torch.Generator().manual_seed(3)
    shapes = OPTIMIZER_SHAPES
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    out = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(leo_dist, cls)(params, lr=0.01, weight_decay=0.1, fused=fused)
        assert opt.fused is fused
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
        out.append([p.detach() for p in params])
    for a, b in zip(*out):
        if cls == "Lion" or a.ndim != 2:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_fused_true_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        leo_dist.Lion([torch.nn.Parameter(torch.zeros(3))], fused=True)
    assert leo_dist.Lion([torch.nn.Parameter(torch.zeros(3))]).fused is False


def _sharded_run(rank, world, kind, fused, steps, bucket_mb):
    from dist_util import groups_for, local_grad, make_params, params_hash
    calls = {"leo2d": 0}
    if fused:  # count the 2-D kernel launches: the sharded matrix step must use them when fused
        from leo_dist import kernels
        real = kernels.leo2d_update_

        def counting(*a, **k):
            calls["leo2d"] += 1
            return real(*a, **k)
        kernels.leo2d_update_ = counting
    params = make_params()
    cls = leo_dist.ShardedLeo if kind == "leo" else leo_dist.ShardedLion
    opt = cls(groups_for(params, kind), bucket_mb=bucket_mb, fused=fused)
    assert opt.fused is fused
    for step in range(steps):
        for p in params:
            p.grad = local_grad(step, rank, p.shape, True)
        opt.step()
    return [p.detach().clone() for p in params], params_hash(params), calls["leo2d"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(leo_dist, "ShardedLion"), reason="leo_dist.ShardedLion not available")
@pytest.mark.parametrize("kind", ["lion", "leo"])
def test_sharded_fused_matches_torch_path_w2(kind, monkeypatch):
    from conftest import run_ranks
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # spawned ranks inherit it
    # 2e-4 MB (~52 fp32 elements) buckets: several buckets, shard boundaries inside parameters,
    # while keeping the number of (slow, interpreted) kernel launches small.
    steps, bucket_mb = 3, 2e-4
    ref = run_ranks(_sharded_run, 2, kind, False, steps, bucket_mb)
    got = run_ranks(_sharded_run, 2, kind, True, steps, bucket_mb)
    assert got[0][1] == got[1][1]  # replicas identical
    if kind == "leo":
        assert got[0][2] > 0 and got[1][2] > 0, "the fused sharded Leo did not run the 2-D kernels"
    for a, b in zip(got[0][0], ref[0][0]):
        if kind == "lion" or a.ndim != 2:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- ahead of time

KERNELS = ["lion", "sign_shard", "apply_signs", "leo2d_sumsq", "leo2d_usq", "leo2d_update"]
# Kernels whose every element load is a streamed tensor (no per-row/column gathers).
FLAT = {"lion", "sign_shard", "apply_signs"}
BUILDS = [(n, a, "fp32") for n in KERNELS for a in (80, 90)] + [(n, 90, "bf16") for n in sorted(FLAT)]

# The AOT builds need Triton imported without the interpreter, so they run in one child process.
_AOT_SCRIPT = r"""
import json, re, sys, warnings
warnings.simplefilter("ignore")
from leo_dist import kernels as K
out = {}
for name, arch, dt in json.loads(sys.argv[1]):
    try:
        ck = K.aot_compile(name, arch, dt)
    except Exception as e:
        out[f"{name}/{arch}/{dt}"] = {"error": f"{type(e).__name__}: {e}"}
        continue
    ptx = ck.asm["ptx"]
    out[f"{name}/{arch}/{dt}"] = {
        "target": re.search(r"\.target (sm_\w+)", ptx).group(1),
        "loads": sorted(set(re.findall(r"ld\.global[.:\w]*", ptx))),
        "bytes": K.ptx_global_bytes(ptx),
        "cubin": len(ck.asm.get("cubin") or b""),
        "threads": K.NUM_WARPS * 32, "block": K.BLOCK,
    }
print("AOT-JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def aot():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # silences 3.9's notice; aot_compile sets the option anyway
    root = os.path.dirname(os.path.dirname(leo_dist.__file__))
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(BUILDS)], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("AOT-JSON")), None)
    assert line is not None, f"AOT child failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(line[len("AOT-JSON"):])


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", KERNELS)
def test_aot_compiles_with_vector_loads(aot, name, arch):
    r = aot[f"{name}/{arch}/fp32"]
    assert "error" not in r, r.get("error")
    assert r["target"] in (f"sm_{arch}", f"sm_{arch}a")
    wide = [ld for ld in r["loads"] if ld.endswith(".v4.b32")]
    assert wide, f"no 128-bit loads in {name}: {r['loads']}"
    if name in FLAT:
        # the only narrow loads allowed are of packed bytes
        assert all(ld.endswith(".v4.b32") or ld.endswith(".b8") for ld in r["loads"]), r["loads"]
    if not r["cubin"]:
        pytest.skip("ptxas did not produce a cubin; the PTX checks above ran")


@pytest.mark.parametrize("name", sorted(FLAT))
def test_aot_bf16_vector_loads(aot, name):
    r = aot[f"{name}/90/bf16"]
    assert "error" not in r, r.get("error")
    assert all(ld.endswith(".v4.b32") or ld.endswith(".b8") for ld in r["loads"]), r["loads"]


def test_aot_lion_moves_20_bytes_per_element(aot):
    """Bytes per element from the PTX's global loads and stores: exactly the minimum, 5 × 4."""
    r = aot["lion/90/fp32"]
    load, store = r["bytes"]
    assert load * r["threads"] / r["block"] == 12 and store * r["threads"] / r["block"] == 8


def test_no_autotune_on_in_place_kernels(K):
    for name in KERNELS:
        fn = K._aot_specs("fp32")[name][0]
        assert not isinstance(fn, triton.runtime.Autotuner), name
