"""How often does each update sign flip between consecutive steps? (Is a flip-coded update worth it?)

A flip-coded update would send, instead of every sign (1 bit per element), only which signs
changed since the last step; with flips independent at rate ``p`` per element, an ideal entropy
coder needs ``H(p) = −p·log2 p − (1−p)·log2(1−p)`` bits per element, and a run-length code of
the flip positions about the same. That beats 1 bit only when ``p`` is well away from 1/2.

This trains the demo's character GPT (launch/gpt.py, one process: the signs are those every rank
of a sharded run would send, since the shards partition the same update) with ``leo_dist.Lion``
or ``leo_dist.Leo`` and records, at every step, ``sign(c)`` with ``c = β1·m + (1−β1)·g`` — the
packed update bits of Lion and of Leo's sign-rule parameters; Leo's matrix direction
``u = c/‖row‖ + c/‖col‖`` has the same signs. It reports the flip rate per step (mean and its
spread over the run), and the bits per element an ideal flip code would need with one flip rate
per step, or one per tensor and step (the mean over steps of ``H``), and writes
docs/results/sign_flips.{json,md}.

    .venv/bin/python benchmarks/sign_flips.py [--steps 300] [--optimizers lion:1e-4 leo:1e-3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import leo_dist  # noqa: E402
from launch.gpt import GPT, GPTConfig, PRESETS, get_batch, load_corpus  # noqa: E402


def entropy(p: float) -> float:
    """Bits per element of an ideal code for independent flips at rate ``p``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def run(optimizer: str, lr: float, steps: int, seed: int, data) -> dict:
    train_ids, _, vocab = data
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, **PRESETS["tiny"])
    model = GPT(cfg)
    if optimizer == "leo":
        opt = leo_dist.Leo(leo_dist.leo_param_groups(model), lr=lr)
    else:
        opt = leo_dist.Lion(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    prev = None
    rates, per_tensor_bits = [], []
    for step in range(steps):
        frac = 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        x, y = get_batch(train_ids, 16, cfg.block_size, gen)
        _, loss = model(x, y)
        loss.backward()
        signs = []
        for group in opt.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                m = opt.state[p].get("exp_avg", torch.zeros_like(p))
                signs.append(torch.lerp(p.grad, m, beta1).reshape(-1) > 0)
        cur = torch.cat(signs)
        if prev is not None:
            flips = cur != prev
            rates.append(float(flips.float().mean()))
            # a code with one flip rate per tensor: the rate-weighted entropy of each tensor's flips
            bits, pos = 0.0, 0
            for t in signs:
                n = t.numel()
                bits += n * entropy(float(flips[pos : pos + n].float().mean()))
                pos += n
            per_tensor_bits.append(bits / cur.numel())
        prev = cur
        opt.step()
        opt.zero_grad()
    skip = min(10, len(rates) // 2)  # the first steps (momentum filling from zero) shown apart
    steady, steady_bits = rates[skip:], per_tensor_bits[skip:]
    p = statistics.mean(steady)
    return {"optimizer": optimizer, "lr": lr, "steps": steps, "seed": seed, "numel": int(prev.numel()),
            "flip_rate_first_steps": rates[:skip], "flip_rate_mean": p,
            "flip_rate_min": min(steady), "flip_rate_max": max(steady),
            "entropy_bits_per_element": statistics.mean(entropy(r) for r in steady),
            "entropy_bits_per_tensor_rates": statistics.mean(steady_bits),
            "entropy_bits_worst_step": max(entropy(r) for r in steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizers", nargs="+", default=["lion:1e-4", "leo:1e-3"])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "sign_flips.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_corpus(max_chars=400_000)
    rows = []
    for spec in args.optimizers:
        name, lr = spec.split(":")
        rows.append(run(name, float(lr), args.steps, args.seed, data))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "flip_rate_first_steps"}), flush=True)
    lines = ["| optimizer (lr) | elements | flip rate per step, mean (min–max), after step 10 | "
             "bits/element, one rate per step (mean of H(p_t)) | one rate per tensor and step | worst step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} ({r['lr']:g}) | {r['numel']:,} | {r['flip_rate_mean']:.3f} "
                     f"({r['flip_rate_min']:.3f}–{r['flip_rate_max']:.3f}) | {r['entropy_bits_per_element']:.3f} | "
                     f"{r['entropy_bits_per_tensor_rates']:.3f} | "
                     f"{r['entropy_bits_worst_step']:.3f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out.replace(".json", ".md"), "w") as f:
        f.write(f"`{' '.join(['benchmarks/sign_flips.py'] + sys.argv[1:])}`, seed {args.seed}\n\n{table}\n")


if __name__ == "__main__":
    main()
