#!/usr/bin/env python
"""How much of each scheme's communication a step hides: the overlap table, plot and projection.

    sudo .venv/bin/python benchmarks/slow_link/run.py --floor --out docs/results/overlap --configs ...
    .venv/bin/python benchmarks/slow_link/overlap.py docs/results/overlap      # this report

Measured (from ``raw/*.json`` of a ``run.py --floor`` run): per configuration and W, the compute
floor (the median step of the timed window on the unshaped loopback), and per link rate the median
step, the bytes on the link per step (all ranks share the one shaped loopback, so this is the
total), the wire time those bytes need at line rate, the exposed communication ``step − floor``
and its fraction of the wire time, and the step over ``max(floor, wire)`` (1.0 would be perfect
overlap).

Projected (the overlap model; docs/overlap.md says why it is the bound): a step is
``fwd + max(bwd, t_grad) + t_step + exposed update``, where ``t_grad`` is the gradient phase of the
scheme's cost model at the link rate, and the update phase (parameter all-gather or broadcast) is
hidden behind the next forward when the scheme overlaps it (``overlap_updates``), else exposed.
Compute per rank from ``6·N·T`` FLOPs at an effective rate (defaults: T = 16384 tokens per rank
and step, 400 TFLOP/s), split 1:2 between forward and backward; the local optimizer step is left
out (a bandwidth pass over the parameters, small beside both).

Writes ``overlap.md``, ``overlap.csv``, ``overlap.png`` and ``projection_overlap.csv`` next to ``raw/``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

import configs  # noqa: E402
import netns  # noqa: E402
import project  # noqa: E402
import report  # noqa: E402

# Configurations whose update all-gather the next forward hides (overlap_updates=True).
UPDATE_OVERLAPPED = {n for n in configs.REGISTRY if "overlap" in n}
COMPUTE_TOKENS = 16384
COMPUTE_FLOPS = 400e12


def measured_rows(raw_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(raw_dir, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        floor = [w for w in r["windows"] if not w["rate_bps"]]
        if not floor:
            continue
        floor_s = statistics.median(floor[0]["step_s"])
        for w in report.steady_windows(r):
            if not w["rate_bps"]:
                continue
            step = statistics.median(w["step_s"])
            link_bytes = w["tx_bytes"] / w["steps"]
            wire = link_bytes * 8 / w["rate_bps"]
            rows.append(dict(config=r["config"], label=configs.REGISTRY[r["config"]].label, world=r["world"],
                             rate=netns.format_rate(w["rate_bps"]), floor_s=floor_s, step_s=step,
                             step_min_s=min(w["step_s"]), step_max_s=max(w["step_s"]),
                             link_mb=link_bytes / 1e6, wire_s=wire, exposed_s=step - floor_s,
                             exposed_of_wire=(step - floor_s) / wire if wire else float("nan"),
                             over_bound=step / max(floor_s, wire), replicas_identical=r.get("replicas_identical"),
                             leo_dist_sha256=r.get("leo_dist_sha256"), run_id=r.get("run_id")))
    return rows


def table(rows: list[dict]) -> str:
    head = ("| config | W | rate | floor s | step s (min–max) | MB on link/step | wire s | exposed s | exposed/wire "
            "| step / max(floor, wire) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {x['config']} | {x['world']} | {x['rate']} | {x['floor_s']:.3f} | {x['step_s']:.3f} "
        f"({x['step_min_s']:.2f}–{x['step_max_s']:.2f}) | {x['link_mb']:.2f} | {x['wire_s']:.3f} | "
        f"{x['exposed_s']:.3f} | {x['exposed_of_wire']:.0%} | {x['over_bound']:.2f} |\n"
        for x in sorted(rows, key=lambda x: (-x["world"], x["rate"], x["config"])))
    return head + body


def overlap_step(cfg: configs.Config, shapes: configs.Shapes, world: int, link_bps: float,
                 tokens: int = COMPUTE_TOKENS, flops: float = COMPUTE_FLOPS) -> dict:
    """The overlap model's step of one scheme (seconds), with its parts."""
    compute = 6 * shapes.numel * tokens / flops
    fwd, bwd = compute / 3, 2 * compute / 3
    lat = math.ceil(math.log2(world)) * project.ALPHA_S
    grad = upd = 0.0
    for ph in cfg.cost(shapes, world):
        t = ph.bytes_per_rank * 8 / link_bps + ph.calls * lat
        if ph.name.startswith(("all_gather", "broadcast")):
            upd += t
        else:
            grad += t
    hidden_upd = cfg.name in UPDATE_OVERLAPPED
    step = fwd + max(bwd, grad) + (max(0.0, upd - fwd) if hidden_upd else upd)
    return dict(compute_s=compute, grad_s=grad, update_s=upd, step_s=step, exposed_s=step - compute)


def projection(names: list[str]) -> list[dict]:
    rows = []
    for label, n_layer, d in project.PROJECTION_MODELS:
        shapes = project.synthetic_shapes(n_layer, d)
        for link in project.PROJECTION_LINKS:
            for world in project.PROJECTION_WORLDS:
                row = dict(model=label, params=shapes.numel, link_gbit=link / 1e9, world=world)
                for name in names:
                    row[name] = overlap_step(configs.REGISTRY[name], shapes, world, link)["step_s"]
                rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(x["world"], x["rate"]) for x in rows}, key=lambda k: (k[0], -len(k[1]), k[1]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4.8), squeeze=False)
    for ax, (world, rate) in zip(axes[0], keys):
        sel = sorted((x for x in rows if (x["world"], x["rate"]) == (world, rate)), key=lambda x: x["config"])
        ys = range(len(sel))
        ax.barh(ys, [x["step_s"] for x in sel], color="#4c72b0", label="step")
        ax.barh(ys, [x["floor_s"] for x in sel], color="#dd8452", height=0.4, label="compute floor")
        ax.scatter([x["wire_s"] for x in sel], list(ys), color="black", marker="|", s=200, zorder=3,
                   label="wire time")
        ax.set_yticks(list(ys), [x["config"] for x in sel], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("seconds per step")
        ax.set_title(f"W={world}, {rate}")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "docs",
                                                               "results", "overlap"))
    args = ap.parse_args(argv)
    rows = measured_rows(os.path.join(args.out, "raw"))
    if not rows:
        raise SystemExit(f"no run with a --floor window under {args.out}/raw")
    with open(os.path.join(args.out, "overlap.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    names = sorted({x["config"] for x in rows})
    proj = projection(names)
    with open(os.path.join(args.out, "projection_overlap.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(proj[0]))
        w.writeheader()
        w.writerows(proj)
    plot(rows, os.path.join(args.out, "overlap.png"))
    text = table(rows)
    pick = [r for r in proj if r["model"] == "7B" and r["link_gbit"] == 100.0]
    ptab = "| W | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n" + "".join(
        f"| {r['world']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |\n" for r in pick)
    with open(os.path.join(args.out, "overlap.md"), "w") as f:
        f.write("# Overlap: compute floor, wire time and exposed communication\n\n")
        f.write(f"Runs: {sorted({x['run_id'] for x in rows})}; library sha256 prefix "
                f"{sorted({x['leo_dist_sha256'] for x in rows})}; replicas identical in every run: "
                f"{all(x['replicas_identical'] for x in rows)}.\n\n")
        f.write(text)
        f.write(f"\n## Projected step, 7B parameters, 100 Gbit/s per rank (overlap model, "
                f"{COMPUTE_TOKENS} tokens/rank, {COMPUTE_FLOPS / 1e12:.0f} TFLOP/s)\n\n")
        f.write(ptab)
    print(text)
    print(ptab)


if __name__ == "__main__":
    main()
