"""Learning-rate sweep: each configuration of the convergence study at its own best lr.

A lossy mode can act like a different step size, so comparing every configuration at one fixed
lr can flatter it or sink it (SPEC section 6). This runs the configurations of
``benchmarks/convergence.py`` at the demo's default lr of their optimizer family times each
``--factors`` entry, run in the order given (weight decay and everything else unchanged, same seeds and data order), and
reports per configuration the final validation loss at every lr, the best lr, and the
configurations compared at their best lrs.

    .venv/bin/python benchmarks/lr_sweep.py --preset tiny --steps 1000 --worlds 2 --seeds 0 \
        --factors 0.333 1 3

Runs at factor 1 are the convergence study's own runs: they are read from its results
(``--reuse``, default docs/convergence/convergence.json) instead of being run again. Every
finished run is kept in ``<out>.json`` as it comes, so the sweep can run in the background and be
extended (more seeds at the best lr, say); ``<out>.md`` is rewritten after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from convergence import CONFIGS, DEFAULT_BATCH, _key  # noqa: E402
from launch.optimizers import DEFAULT_LR, family  # noqa: E402
from onebit_convergence import ROOT, run  # noqa: E402


def base_lr(config: str) -> float:
    """The demo's default lr for the optimizer family of ``config``."""
    flags = CONFIGS[config]
    return DEFAULT_LR[family(flags[flags.index("--optimizer") + 1])]


def sweep_key(config: str, factor: float, world: int, seed: int, preset: str, steps: int, batch: int) -> str:
    """The convergence study's key, plus the lr factor where it is not 1."""
    key = _key(config, world, seed, preset, steps, batch)
    return key if factor == 1 else f"{key}|lr*{factor:g}"


def summarise(runs: dict, configs: list[str], factors: list[float], world: int) -> list[dict]:
    """Per configuration (in ``configs`` order): mean validation loss at each factor over the seeds
    run there (with half the spread and the number of seeds), and the best factor: the lowest mean
    over the seeds that every measured factor shares (all seeds where they share none), so that more
    seeds at one lr cannot decide the choice."""
    out = []
    for config in configs:
        by_factor = {}
        for f in factors:
            got = {r["seed"]: r["val_loss"] for r in runs.values() if r["config"] == config and r["world"] == world
                   and r["lr_factor"] == f}
            if got:
                by_factor[f] = got
        if not by_factor:
            continue
        cells = {f: (statistics.fmean(v.values()), (max(v.values()) - min(v.values())) / 2, len(v))
                 for f, v in by_factor.items()}
        common = set.intersection(*(set(v) for v in by_factor.values()))
        best = min(by_factor, key=lambda f: statistics.fmean(by_factor[f][s] for s in common) if common
                   else cells[f][0])
        out.append(dict(config=config, cells=cells, best=best, lr=base_lr(config) * best,
                        chosen_on=sorted(common)))
    return out


def report(runs: dict, configs: list[str], factors: list[float], args, command: str) -> str:
    lines = [f"# Learning-rate sweep: model `{args.preset}`, {args.steps} steps, {args.batch_size} sequences "
             "per rank\n",
             f"Command: `{command}` (results accumulate in `{os.path.basename(args.out)}.json`; factor-1 runs are "
             f"the convergence study's, from `{os.path.relpath(args.reuse, ROOT)}`).\n",
             "Final validation loss, mean over the seeds run (their number in brackets) ± half the spread, at "
             "the family's default lr times each factor (Leo 1e-3, Lion 3e-4, AdamW 2e-3); **bold**: the "
             "configuration's best, chosen on the seeds that all its lrs share (`chosen on`). The last column "
             "compares each configuration's mean at its best lr with exact Leo's at its best.\n"]
    runs = {k: r for k, r in runs.items() if r["preset"] == args.preset and r["steps"] == args.steps
            and r.get("batch", DEFAULT_BATCH) == args.batch_size}
    for world in args.worlds:
        rows = summarise(runs, configs, factors, world)
        if not rows:
            continue
        ref = next((r for r in rows if r["config"] == "leo exact"), None)
        lines += [f"## W={world}\n",
                  "| configuration | " + " | ".join(f"lr ×{f:g}" for f in factors)
                  + " | best lr | chosen on seeds | at best vs exact Leo at its best |",
                  "|---|" + "---|" * len(factors) + "---|---|---|"]
        for r in rows:
            cells = []
            for f in factors:
                if f not in r["cells"]:
                    cells.append("–")
                    continue
                mean, spread, n = r["cells"][f]
                text = f"{mean:.4f} ± {spread:.4f} ({n})"
                cells.append(f"**{text}**" if f == r["best"] else text)
            rel = "–"
            if ref is not None:
                rel = f"{100 * (r['cells'][r['best']][0] / ref['cells'][ref['best']][0] - 1):+.2f}%"
            seeds = " ".join(map(str, r["chosen_on"])) or "–"
            lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['lr']:.3g} | {seeds} | {rel} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="sequences per rank and step")
    ap.add_argument("--factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--reuse", default=os.path.join(ROOT, "docs", "convergence", "convergence.json"),
                    help="the convergence study's results, whose runs are the factor-1 runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "convergence", "lr_sweep"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the results, run nothing")
    args = ap.parse_args()
    for f in args.factors:
        if not f > 0:
            raise SystemExit(f"--factors: each must be > 0, got {f}")
    order = list(dict.fromkeys(round(f, 3) for f in args.factors))  # run in the order given
    factors = sorted(order)
    path = args.out + ".json"
    runs = json.load(open(path))["runs"] if os.path.exists(path) else {}
    reused = json.load(open(args.reuse))["runs"] if os.path.exists(args.reuse) else {}
    command = (f".venv/bin/python benchmarks/lr_sweep.py --preset {args.preset} --steps {args.steps} "
               f"--worlds {' '.join(map(str, args.worlds))} --seeds {' '.join(map(str, args.seeds))} "
               f"--factors {' '.join(f'{f:g}' for f in order)}"
               + (f" --batch-size {args.batch_size}" if args.batch_size != DEFAULT_BATCH else ""))

    def save() -> None:
        with open(path, "w") as fh:
            json.dump(dict(command=command, runs=runs), fh, indent=1)
        with open(args.out + ".md", "w") as fh:
            fh.write(report(runs, args.configs, factors, args, command))

    # every seed the convergence study has at the default lr is a factor-1 run of the sweep
    for seed in sorted({r["seed"] for r in reused.values()}):
        for world in args.worlds:
            for config in args.configs:
                key = sweep_key(config, 1.0, world, seed, args.preset, args.steps, args.batch_size)
                if key in reused and key not in runs and 1.0 in factors:
                    runs[key] = dict(reused[key], lr_factor=1.0, lr=base_lr(config), reused=True)
    for seed in [] if args.report_only else args.seeds:
        for world in args.worlds:
            for f in order:
                for config in args.configs:
                    key = sweep_key(config, f, world, seed, args.preset, args.steps, args.batch_size)
                    if key in runs:
                        continue
                    lr = base_lr(config) * f
                    ns = types.SimpleNamespace(world=world, steps=args.steps, preset=args.preset, seed=seed)
                    r = run(config, CONFIGS[config] + ["--batch-size", str(args.batch_size), "--lr", f"{lr:.6g}"], ns)
                    runs[key] = dict(r, world=world, seed=seed, preset=args.preset, steps=args.steps,
                                     batch=args.batch_size, lr_factor=f, lr=lr)
                    print(f"{key}: lr {lr:.3g}, val {r['val_loss']:.4f}", flush=True)
                    save()
    save()
    print(report(runs, args.configs, factors, args, command))


if __name__ == "__main__":
    main()
