#!/usr/bin/env python
"""Cost of the 1-bit gradient codec on one core: the C codec against the torch ops, beside the
bf16 cast and the fp32 copy that the other modes pay for the same bucket.

    .venv/bin/python benchmarks/onebit_codec.py [--numel 10795008] [--world 2] [--repeats 7]

Times, per rank and step, compressing the whole local gradient (``compress_grad_stream_``, its
fill copy included, as the exchange runs it) and decoding the W messages of one owner's shard,
medians of ``--repeats`` runs. Writes docs/results/onebit_codec.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402
from local_step import median_time  # noqa: E402  (benchmarks/local_step.py: a warm-up, then the median)

from leo_dist import cpu_step, onebit  # noqa: E402
from leo_dist.exchange import CHUNK_ELEMS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=10_795_008, help="gradient elements (default: the 10m preset)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "onebit_codec.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, w = args.numel, args.world
    shard = -(-n // (w * onebit.GRAD_CHUNK)) * onebit.GRAD_CHUNK
    x = torch.randn(w * shard)
    err = torch.zeros(w * shard)
    out = torch.empty(w, onebit.grad_payload_bytes(shard), dtype=torch.uint8)
    cols = onebit.block_columns(w, CHUNK_ELEMS)
    xv = x.view(w, shard)
    fill = lambda j0, j1, xc: xc.copy_(xv[:, j0:j1])  # noqa: E731
    rows = {}
    for name, use_c in (("C", True), ("torch", False)):
        if use_c and not cpu_step.available():
            continue
        onebit.USE_C = use_c
        compress = lambda: onebit.compress_grad_stream_(fill, err, out, w, shard, n, cols)  # noqa: E731
        rows[name] = dict(compress_s=median_time(compress, args.repeats),
                          decode_s=median_time(lambda: onebit.decode_grad(out, w, shard, cols=cols), args.repeats))
    onebit.USE_C = True
    rows["bf16 cast (the bf16 mode's staging)"] = dict(
        compress_s=median_time(lambda: x.to(torch.bfloat16), args.repeats))
    rows["fp32 copy (one bandwidth pass)"] = dict(compress_s=median_time(lambda: x.clone(), args.repeats))
    print(f"{n} elements, W={w}, one thread, medians of {args.repeats}")
    print(f"{'':40s} {'compress ms':>12s} {'decode ms':>10s}")
    for name, r in rows.items():
        dec = f"{r['decode_s'] * 1e3:10.1f}" if "decode_s" in r else f"{'':>10s}"
        print(f"{name:40s} {r['compress_s'] * 1e3:12.1f} {dec}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(numel=n, world=w, repeats=args.repeats, torch=torch.__version__,
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
