"""Local-step benchmark: the CPU path of leo_dist against lion_pytorch.Lion and the bandwidth floor.

    .venv/bin/python benchmarks/local_step.py [--numel 33554432] [--repeats 7] [--out docs/local_step.json]

What it measures (median wall time of ``--repeats`` steps after one warm-up, on the same tensors):

* ``lion_pytorch.Lion.step`` (op-by-op torch, the baseline), ``leo_dist.Lion.step`` on the C path
  and on the foreach torch path (``functional.lion_update``), ``leo_dist.Leo.step`` (2-D rule and
  sign rule), and the two sharded passes ``local_step.sign_shard_step_`` / ``apply_signs_``;
* this machine's copy rate: the best of ``torch.Tensor.copy_`` and ``numpy.copyto`` over two
  fp32 buffers of ``--numel`` elements, counted as 8 bytes per element (read + write), and of an
  in-place ``a.add_(b)`` counted as 12 (read a, b; write a);
* the floor of each step: the bytes it must move (e.g. 20 B/element for Lion: read p, g, m; write
  p, m) divided by the copy rate. ``floor ratio`` = time / floor (≤ 1.3 is the target; below 1 is
  possible because a copy also pays a read-for-ownership of the destination that an in-place
  update does not).

It also prints the GPU kernels' bytes per element, from the PTX of their ahead-of-time builds
(``kernels.aot_compile``) when Triton is installed. Results go to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import leo_dist  # noqa: E402
from leo_dist import cpu_step, local_step  # noqa: E402
from leo_dist import functional as F  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, lazy state creation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def shapes_for(numel: int) -> list[tuple[int, ...]]:
    """A transformer-like mix: square-ish matrices holding ~97% of the elements, plus vectors."""
    side = 2048
    n_mat = max(1, int(numel * 0.97) // (side * side))
    shapes: list[tuple[int, ...]] = [(side, side)] * n_mat
    rest = numel - n_mat * side * side
    while rest > 0:
        k = min(rest, 1 << 20)
        shapes.append((k,))
        rest -= k
    return shapes


def make_params(shapes, seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def copy_rate(numel: int, repeats: int) -> tuple[float, str]:
    a, b = torch.empty(numel), torch.randn(numel)
    an, bn = a.numpy(), b.numpy()
    rates = {
        "torch.copy_": 8 * numel / median_time(lambda: a.copy_(b), repeats),
        "numpy.copyto": 8 * numel / median_time(lambda: np.copyto(an, bn), repeats),
        # in place, as the optimizer steps are: read a and b, write a back (no read-for-ownership)
        "torch.add_ in place": 12 * numel / median_time(lambda: a.add_(b), repeats),
    }
    best = max(rates, key=rates.get)
    return rates[best], best


def gpu_bytes_table() -> list[dict]:
    """Bytes per element of each kernel: from the PTX for the flat kernels, by design for the rest."""
    try:
        import warnings
        warnings.simplefilter("ignore")
        from leo_dist import kernels
    except Exception as e:  # noqa: BLE001
        return [{"error": f"triton unavailable: {e}"}]
    rows = []
    flat = {"lion": ("Lion / sign-rule step", 20.0), "sign_shard": ("shard step (bits + zeros)", 12.25),
            "apply_signs": ("decode-and-apply (bits + zeros)", 8.25)}
    for name, (what, minimum) in flat.items():
        ck = kernels.aot_compile(name, 90, "fp32")
        load, store = kernels.ptx_global_bytes(ck.asm["ptx"])
        threads = kernels.NUM_WARPS * 32
        per = (load + store) * threads / kernels.BLOCK
        rows.append(dict(kernel=name, what=what, bytes_per_element=per, minimum=minimum, source="PTX (sm_90)"))
    rows.append(dict(kernel="leo2d (3 passes)", what="Leo 2-D: norms, Σu², update", bytes_per_element=36.0,
                     minimum=20.0, source="design: 8 + 8 + 20 (+ O(R+C) partial sums)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=32 * 2**20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="docs/local_step.json")
    args = ap.parse_args()

    from lion_pytorch import Lion as RefLion

    n = args.numel
    shapes = shapes_for(n)
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"{n / 2**20:.1f}M fp32 elements in {len(shapes)} tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, C path available: {cpu_step.available()}")
    rate, rate_src = copy_rate(n, args.repeats)
    print(f"copy rate: {rate / 1e9:.2f} GB/s ({rate_src})")

    results = {}

    def record(name, seconds, bytes_per_elem):
        floor = bytes_per_elem * n / rate
        results[name] = dict(seconds=seconds, bytes_per_element=bytes_per_elem, floor_seconds=floor,
                             floor_ratio=seconds / floor)

    kw = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    params = make_params(shapes, 0)
    ref = RefLion(params, **kw)
    record("lion_pytorch.Lion", median_time(ref.step, args.repeats), 20)
    del ref

    params = make_params(shapes, 0)
    opt = leo_dist.Lion(params, **kw)
    record("leo_dist.Lion (C path)", median_time(opt.step, args.repeats), 20)
    state = [opt.state[p]["exp_avg"] for p in params]
    grads = [p.grad for p in params]
    data = [p.data for p in params]
    record("functional.lion_update (foreach torch)", median_time(
        lambda: F.lion_update(data, grads, state, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1),
        max(3, args.repeats // 2)), 20)
    del opt, state

    params = make_params(shapes, 0)
    opt = leo_dist.Leo(params, lr=1e-4, weight_decay=0.1)
    record("leo_dist.Leo 2-D rule (C path)", median_time(opt.step, args.repeats), 20)
    del opt
    opt = leo_dist.Leo(params, lr=1e-4, weight_decay=0.1, orthogonalize=False)
    record("leo_dist.Leo sign rule (C path)", median_time(opt.step, args.repeats), 20)
    state = [opt.state[p]["exp_avg"] for p in params]
    record("functional.leo_update 2-D rule (torch)", median_time(
        lambda: F.leo_update(data, grads, state, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1,
                             align_const=0.2, eps=1e-8), max(3, args.repeats // 2)), 20)
    del opt, state, params, grads, data

    g, m = torch.randn(n // 8 * 8), torch.randn(n // 8 * 8)
    bits = torch.empty(n // 8, dtype=torch.uint8)
    zeros = torch.empty_like(bits)
    p = torch.randn(n // 8 * 8)
    record("sign_shard_step_ (C)", median_time(
        lambda: local_step.sign_shard_step_(g, m, bits, zeros, g.numel(), 0.9, 0.99), args.repeats), 12.25)
    record("sign_shard_step_ (torch)", median_time(
        lambda: local_step._sign_shard_step_torch(g, m, bits, zeros, g.numel(), 0.9, 0.99), 3), 12.25)
    record("apply_signs_ (C)", median_time(
        lambda: local_step.apply_signs_(p, bits, zeros, 1e-4, 0.1, 1.0), args.repeats), 8.25)
    record("apply_signs_ (torch)", median_time(
        lambda: local_step._apply_signs_torch(p, bits, zeros, 1e-4, 0.1, 1.0), 3), 8.25)

    base = results["lion_pytorch.Lion"]["seconds"]
    print("\n| step | median ms | vs lion_pytorch | B/elem floor | floor ms | time / floor |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        speed = base / r["seconds"]
        print(f"| {name} | {1e3 * r['seconds']:.1f} | {speed:.2f}x | {r['bytes_per_element']} | "
              f"{1e3 * r['floor_seconds']:.1f} | {r['floor_ratio']:.2f} |")

    table = gpu_bytes_table()
    print("\nGPU kernels, bytes moved per fp32 element:")
    print("| kernel | what | bytes/element | minimum | source |")
    print("|---|---|---|---|---|")
    for r in table:
        if "error" in r:
            print(f"| {r['error']} |")
        else:
            print(f"| {r['kernel']} | {r['what']} | {r['bytes_per_element']:.2f} | {r['minimum']} | {r['source']} |")

    out = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), numel=n, shapes=len(shapes),
               machine=dict(platform=platform.platform(), processor=platform.processor(),
                            cpu_capability=torch.backends.cpu.get_cpu_capability(),
                            threads=torch.get_num_threads()),
               copy_rate_GBps=rate / 1e9, copy_rate_source=rate_src, cpu_build=cpu_step.build_info(),
               results=results, speedup_vs_lion_pytorch={k: base / v["seconds"] for k, v in results.items()},
               gpu_bytes_per_element=table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
