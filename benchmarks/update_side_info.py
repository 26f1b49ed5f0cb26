"""Side information for Leo's 1-bit matrix updates: does a magnitude model with Leo's structure pay?

``update_comm="1bit"`` sends ``sign(e)`` of each matrix update (plus error buffer) with one scale
per row, ``α_i = mean_j |e_ij|``. Leo's direction is built from row and column norms, so a
rank-1 magnitude model ``|e_ij| ≈ a_i·b_j`` (row *and* column scales, R + C floats per matrix)
might fit better. This measures, on the updates of a real training run (the demo's GPT, the
single-process Leo oracle, batches of 16), the relative squared error ``‖u − ŝ⊙sign(u)‖² / ‖u‖²``
of the 1-bit approximation of every matrix update ``u`` for: one scale for the whole matrix,
one per run of 1024 elements, one per row (what is built), and the rank-1 row × column fit
(three alternating least-squares passes). Weighted over matrices by ``‖u‖²``.

    .venv/bin/python benchmarks/update_side_info.py --preset tiny --steps 300

Writes docs/results/update_side_info.{json,md}. For reference: for Gaussian entries the best
single scale leaves ``1 − 2/π = 0.363`` of the energy; what no magnitude model removes is the
spread of ``|u|`` inside a row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import leo_dist  # noqa: E402
from launch.gpt import GPT, PRESETS, GPTConfig, get_batch, load_corpus  # noqa: E402
from leo_dist.functional import interpolate, leo_direction  # noqa: E402


def scales(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-element magnitude models of ``a = |u|`` (R, C), each broadcastable to it."""
    flat = a.reshape(-1)
    runs = torch.cat([flat[i:i + 1024].mean().expand(min(1024, flat.numel() - i))
                      for i in range(0, flat.numel(), 1024)]).view_as(a)
    col = a.mean(0, keepdim=True)
    for _ in range(3):  # least squares of a ≈ row·col, alternating
        row = (a * col).sum(1, keepdim=True) / col.square().sum()
        col = (a * row).sum(0, keepdim=True) / row.square().sum()
    return {"one per matrix": a.mean(), "one per 1024 elements": runs, "one per row (built)": a.mean(1, keepdim=True),
            "row x column (rank 1)": row * col}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--at", type=int, nargs="+", default=[20, 100, 200, 300])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "update_side_info"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, _, vocab = load_corpus(max_chars=2_000_000)
    cfg = GPTConfig(vocab_size=vocab, **PRESETS[args.preset])
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = leo_dist.Leo(leo_dist.leo_param_groups(model, weight_decay=0.01), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(1, args.steps + 1):
        x, y = get_batch(train, 16, cfg.block_size, gen)
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        if step in args.at:
            num, den = {}, 0.0
            for grp in opt.param_groups:
                for p in grp["params"]:
                    if not grp.get("orthogonalize") or p.ndim != 2 or p.grad is None:
                        continue
                    m = opt.state[p].get("exp_avg", torch.zeros_like(p))
                    u = leo_direction(interpolate(m, p.grad, 0.9), 1e-8)
                    w = u.square().sum().item()
                    den += w
                    for name, s in scales(u.abs()).items():
                        num[name] = num.get(name, 0.0) + (u - s * torch.sign(u)).square().sum().item()
            rows.append(dict(step=step, loss=loss.item(), **{k: v / den for k, v in num.items()}))
            print(rows[-1], flush=True)
        opt.step()
    names = list(scales(torch.ones(2, 2)))
    lines = [f"Relative squared error of the 1-bit approximation of Leo's matrix updates, preset `{args.preset}`, "
             f"single-process Leo (lr 1e-3), batch 16. Command: `.venv/bin/python benchmarks/update_side_info.py "
             f"--preset {args.preset} --steps {args.steps}`\n",
             "| step | train loss | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['step']} | {r['loss']:.3f} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(preset=args.preset, steps=args.steps, rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
