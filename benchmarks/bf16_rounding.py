"""bf16 parameters under Lion/Leo: round-to-nearest against stochastic rounding, and float32.

Trains the demo's character GPT (launch/gpt.py, the "tiny" preset, the standard library's own
sources as data) in one process with ``ShardedLion``/``ShardedLeo`` (world of one: the same
apply path as every rank of a sharded run), three ways: float32 parameters, bfloat16 parameters
rounded to nearest, bfloat16 with ``bf16_rounding="stochastic"``. Same seeds and data order.
Reports the final validation loss and the fraction of weights that moved at all in the first
10 steps, and writes docs/results/bf16_rounding.json and a markdown table.

    .venv/bin/python benchmarks/bf16_rounding.py [--steps 300] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import leo_dist  # noqa: E402
from launch.gpt import GPT, GPTConfig, PRESETS, get_batch, load_corpus  # noqa: E402

CONFIGS = {"fp32": (torch.float32, "nearest"), "bf16_nearest": (torch.bfloat16, "nearest"),
           "bf16_stochastic": (torch.bfloat16, "stochastic")}


def run(name: str, optimizer: str, lr: float, steps: int, seed: int, data) -> dict:
    dtype, rounding = CONFIGS[name]
    train_ids, val_ids, vocab = data
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, **PRESETS["tiny"])
    model = GPT(cfg).to(dtype)
    params = leo_dist.leo_param_groups(model) if optimizer == "leo" else model.parameters()
    cls = leo_dist.ShardedLeo if optimizer == "leo" else leo_dist.ShardedLion
    opt = cls(params, lr=lr, bf16_rounding=rounding)
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    moved = None
    for step in range(steps):
        frac = 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159265))).item()
        for g in opt.param_groups:
            g["lr"] = lr * frac
        x, y = get_batch(train_ids, 16, cfg.block_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 9:
            changed = sum(int((p.detach() != s).sum()) for p, s in zip(model.parameters(), start))
            moved = changed / sum(s.numel() for s in start)
    vgen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = []
        for _ in range(8):
            x, y = get_batch(val_ids, 16, cfg.block_size, vgen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                losses.append(float(model(x, y)[1]))
    return {"config": name, "optimizer": optimizer, "lr": lr, "seed": seed, "steps": steps,
            "val_loss": statistics.mean(losses), "moved_in_10_steps": moved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["lion:1e-4", "leo:1e-3"])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "bf16_rounding.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_corpus(max_chars=400_000)
    rows = []
    for spec in args.optimizers:
        optimizer, lr = spec.split(":")
        for name in CONFIGS:
            for seed in args.seeds:
                t0 = time.time()
                r = run(name, optimizer, float(lr), args.steps, seed, data)
                r["seconds"] = round(time.time() - t0, 1)
                rows.append(r)
                print(json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| optimizer (lr) | parameters | val loss (mean ± spread over seeds) | weights moved in 10 steps |",
             "|---|---|---|---|"]
    for spec in args.optimizers:
        optimizer, lr = spec.split(":")
        for name in CONFIGS:
            sel = [r for r in rows if r["optimizer"] == optimizer and r["config"] == name]
            vals = [r["val_loss"] for r in sel]
            spread = (max(vals) - min(vals)) / 2
            moved = statistics.mean(r["moved_in_10_steps"] for r in sel)
            lines.append(f"| {optimizer} ({lr}) | {name} | {statistics.mean(vals):.4f} ± {spread:.4f} | {moved:.1%} |")
    table = "\n".join(lines)
    print(table)
    with open(args.out.replace(".json", ".md"), "w") as f:
        f.write(f"`{' '.join(sys.argv)}`, {args.steps} steps, seeds {args.seeds}\n\n{table}\n")


if __name__ == "__main__":
    main()
