"""Convergence evidence across seeds: which ShardedLeo configuration to recommend.

Runs the demo (``launch/train.py``, via :func:`onebit_convergence.run`) for every configuration,
seed and world size asked, the full learning-rate schedule each time, and keeps every finished
run in ``<out>.json`` as it comes (a rerun skips what is there, so it can run in the background
and be extended). The report, ``<out>.md`` and ``<out>.png``, gives per configuration and world
size the mean final validation loss over seeds with its spread (half the max − min), its
difference from exact Leo's mean, and the bytes each rank sends per step against DDP's fp32
all-reduce. Losses do not depend on the machine's load, so runs may share the cores with other
work; times are not reported.

    .venv/bin/python benchmarks/convergence.py --preset tiny --steps 1000 --worlds 2 --seeds 0 1 2

DDP + PowerSGD runs torch's hook through the demo's ``--grad-comm powersgd``, with Leo or Lion as
the optimizer (its bytes: the hook's rank-4 factors by the ring cost model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from onebit_convergence import ROOT, run  # noqa: E402

LEO = ["--optimizer", "sharded_leo"]
# name -> train.py flags; exact Leo first (the reference of the "vs exact" column)
CONFIGS = {
    "leo exact": LEO,
    "leo update_comm=bf16": LEO + ["--update-comm", "bf16"],
    "leo update_comm=1bit": LEO + ["--update-comm", "1bit"],
    "leo bf16 grads, update_comm=1bit": LEO + ["--grad-comm", "bf16", "--update-comm", "1bit"],
    "leo bf16 grads, update_comm=bf16": LEO + ["--grad-comm", "bf16", "--update-comm", "bf16"],
    "leo grad_comm=1bit": LEO + ["--grad-comm", "1bit"],
    "leo grad_comm=1bit, warm-up 10": LEO + ["--grad-comm", "1bit", "--grad-comm-warmup", "10"],
    "leo grad_comm=1bit, warm-up 50": LEO + ["--grad-comm", "1bit", "--grad-comm-warmup", "50"],
    # the default 50-step warm-up sent in bf16 (warmup_grad_comm="bf16"), against "leo grad_comm=1bit"
    "leo grad_comm=1bit, bf16 warm-up": LEO + ["--grad-comm", "1bit", "--warmup-grad-comm", "bf16"],
    # one bit on both sides: the slow-link suite's fastest Leo to its target at W=2 (docs/benchmarks.md)
    "leo grad_comm=1bit, update_comm=1bit": LEO + ["--grad-comm", "1bit", "--update-comm", "1bit"],
    "lion exact": ["--optimizer", "sharded_lion"],
    "lion grad_comm=1bit": ["--optimizer", "sharded_lion", "--grad-comm", "1bit"],
    "lion grad_comm=1bit, warm-up 10": ["--optimizer", "sharded_lion", "--grad-comm", "1bit", "--grad-comm-warmup", "10"],
    "lion grad_comm=1bit, warm-up 50": ["--optimizer", "sharded_lion", "--grad-comm", "1bit", "--grad-comm-warmup", "50"],
    "lion grad_comm=1bit, bf16 warm-up": ["--optimizer", "sharded_lion", "--grad-comm", "1bit",
                                          "--warmup-grad-comm", "bf16"],
    "adamw (DDP)": ["--optimizer", "adamw", "--ddp"],
    # torch's PowerSGD hook (rank 4, error feedback) on DDP, with the same optimizer as the sharded rows
    "leo + DDP PowerSGD": ["--optimizer", "leo", "--ddp", "--grad-comm", "powersgd"],
    "lion + DDP PowerSGD": ["--optimizer", "lion", "--ddp", "--grad-comm", "powersgd"],
}
DEFAULT_BATCH = 16  # launch/cli.py's --batch-size default; runs at it keep their old keys


def _key(config: str, world: int, seed: int, preset: str, steps: int, batch: int = DEFAULT_BATCH) -> str:
    return f"{config}|W{world}|seed{seed}|{preset}|{steps}" + (f"|b{batch}" if batch != DEFAULT_BATCH else "")


def report(runs: dict, preset: str, steps: int, out: str, command: str, batch: int = DEFAULT_BATCH) -> str:
    rows, curves = [], {}
    runs = {k: r for k, r in runs.items() if r.get("batch", DEFAULT_BATCH) == batch}
    for config in CONFIGS:
        for world in sorted({r["world"] for r in runs.values()}):
            done = [r for r in runs.values() if r["config"] == config and r["world"] == world
                    and r["preset"] == preset and r["steps"] == steps]
            if not done:
                continue
            vals = [r["val_loss"] for r in done]
            rows.append((config, world, len(done), statistics.fmean(vals), (max(vals) - min(vals)) / 2,
                         statistics.fmean(r["ratio_vs_ddp"] for r in done)))
            curves[(config, world)] = done
    ref = {w: m for c, w, _, m, _, _ in rows if c == "leo exact"}
    lines = [f"# Convergence across seeds: model `{preset}`, {steps} steps, {batch} sequences per rank\n",
             f"Command: `{command}` (results accumulate in `{os.path.basename(out)}.json`).\n",
             "Final validation loss, mean over seeds ± half the spread; \"vs exact\": relative difference from "
             "exact Leo's mean at the same W; bytes: sent per rank per step after warm-ups (`opt.comm_stats()`) "
             "against DDP's fp32 ring all-reduce.\n",
             "| configuration | W | seeds | val loss | vs exact Leo | bytes vs DDP fp32 |", "|---|---|---|---|---|---|"]
    for config, world, n, mean, spread, ratio in rows:
        rel = f"{100 * (mean / ref[world] - 1):+.2f}%" if world in ref else "–"
        lines.append(f"| {config} | {world} | {n} | {mean:.4f} ± {spread:.4f} | {rel} | {ratio:.3f} |")
    text = "\n".join(lines) + "\n"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for (config, world), done in curves.items():
            steps_at = [s for s, _ in done[0]["losses"]]
            mean = [statistics.fmean(r["losses"][i][1] for r in done) for i in range(len(steps_at))]
            ax.plot(steps_at, mean, label=f"{config}, W={world}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out + ".png", dpi=110)
    except ImportError:
        pass
    return text


def gaps(runs: dict, world: int, preset: str, steps: int, points=None, window: int | None = None) -> str:
    """Markdown table: training loss of every configuration against the same optimizer exact
    ("leo exact" or "lion exact"), mean over the seeds both ran, each loss averaged over the
    ``window`` steps before the point (the demo logs every 10 steps). By default the points are
    10, 20, 30, 50, 70, 90 and 100% of the schedule and the window 5% of it."""
    if points is None:
        points = tuple(round(steps * f) for f in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))
    if window is None:
        window = max(10, round(steps * 0.05))
    def curve(config, seed):
        r = runs.get(_key(config, world, seed, preset, steps))
        return None if r is None else dict(r["losses"])

    seeds = sorted({r["seed"] for r in runs.values() if "seed" in r})
    lines = ["| configuration | " + " | ".join(map(str, points)) + " |", "|---|" + "---|" * len(points)]
    for config in CONFIGS:
        ref = "lion exact" if config.startswith("lion") else "leo exact"
        if config in (ref, "adamw (DDP)"):
            continue
        pairs = [(curve(config, s), curve(ref, s)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            continue
        cells = []
        for point in points:
            rel = []
            for a, b in pairs:
                keys = [k for k in a if point - window < k <= point and k in b]
                rel.append(sum(a[k] for k in keys) / sum(b[k] for k in keys) - 1)
            cells.append(f"{100 * sum(rel) / len(rel):+.2f}%")
        lines.append(f"| {config} (vs {ref}, {len(pairs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="sequences per rank and step")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "convergence", "convergence"))
    ap.add_argument("--gaps", action="store_true",
                    help="print training loss against the same optimizer exact along the schedule, run nothing")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    path = args.out + ".json"
    runs = json.load(open(path))["runs"] if os.path.exists(path) else {}
    if args.gaps:
        for world in args.worlds:
            print(f"W={world}\n" + gaps(runs, world, args.preset, args.steps))
        return
    command = (f".venv/bin/python benchmarks/convergence.py --preset {args.preset} --steps {args.steps} "
               f"--worlds {' '.join(map(str, args.worlds))} --seeds {' '.join(map(str, args.seeds))}"
               + (f" --batch-size {args.batch_size}" if args.batch_size != DEFAULT_BATCH else ""))
    # seeds outermost: every configuration gets its first seed before any gets its third
    for seed in args.seeds:
        for world in args.worlds:
            for config in args.configs:
                key = _key(config, world, seed, args.preset, args.steps, args.batch_size)
                if key in runs:
                    continue
                ns = types.SimpleNamespace(world=world, steps=args.steps, preset=args.preset, seed=seed)
                r = run(config, CONFIGS[config] + ["--batch-size", str(args.batch_size)], ns)
                runs[key] = dict(r, world=world, seed=seed, preset=args.preset, steps=args.steps,
                                 batch=args.batch_size)
                print(f"{key}: val {r['val_loss']:.4f}, {r['ratio_vs_ddp']:.3f}x DDP bytes", flush=True)
                with open(path, "w") as f:
                    json.dump(dict(command=command, runs=runs), f, indent=1)
                with open(args.out + ".md", "w") as f:
                    f.write(report(runs, args.preset, args.steps, args.out, command, args.batch_size))
    print(report(runs, args.preset, args.steps, args.out, command, args.batch_size))


if __name__ == "__main__":
    main()
