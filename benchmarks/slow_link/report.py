#!/usr/bin/env python
"""Table, CSVs, plots and projection from the raw JSON of a slow-link run (see run.py).

    .venv/bin/python benchmarks/slow_link/report.py [OUT_DIR] [--target-loss 2.75]

Definitions (per configuration, world size W and rate):
- bytes/rank/step, measured: loopback tx bytes over the timed window / (timed steps · W).
- bytes/rank/step, model: configs.py's cost model for this model's parameter shapes.
- step time: median of the timed steps' wall times on rank 0.
- steps to target: first step at which the validation loss (evaluated every few steps) is
  <= target, interpolated linearly between the two evaluations around the crossing.
- time to target: steps to target × median step time at that rate. A lossy configuration whose
  first steps run uncompressed (PowerSGD's all-reduce steps, the 1-bit modes' exact warm-up;
  ``uncompressed_steps`` in the raw file) counts those at the median of its warm-up window at
  that rate (run.py --warmup-window-at) and the rest at the steady window's; a raw file without
  a warm-up window counts every step at the steady speed (``warmup_step_s`` empty). The loss
  curve is trained on the unshaped loopback (the arithmetic does not depend on the link) and the
  step times are measured on the shaped one, in the same run; evaluation time is not counted.
- final loss: validation loss after the step budget.
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
sys.path.insert(0, HERE)

import configs  # noqa: E402
import netns  # noqa: E402
import project  # noqa: E402

BASELINE = "ddp_adamw"


def load(out: str, only_run: str | None = None) -> list[dict]:
    recs = []
    for path in sorted(glob.glob(os.path.join(out, "raw", "*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if only_run is None or rec.get("run_id") == only_run:
            recs.append(rec)
    order = {n: i for i, n in enumerate(configs.REGISTRY)}
    recs.sort(key=lambda r: (-r["world"], order.get(r["config"], 99)))
    return recs


def steady_windows(rec: dict) -> list[dict]:
    """The windows timed after every warm-up (all windows of a raw file older than warm-up windows)."""
    return [w for w in rec["windows"] if w.get("phase", "main") == "main"]


def time_to_target(stt: float | None, steady_s: float, uncompressed: int = 0,
                   warmup_s: float | None = None) -> float | None:
    """Seconds to ``stt`` steps: the first ``uncompressed`` of them at ``warmup_s`` when it was
    timed, the rest (all, when it was not) at ``steady_s``."""
    if stt is None:
        return None
    if warmup_s is None:
        return stt * steady_s
    first = min(stt, uncompressed)
    return first * warmup_s + (stt - first) * steady_s


def steps_to_target(evals: list, target: float) -> float | None:
    prev = None
    for step, loss in evals:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def borrow_twin_curves(recs: list[dict]) -> None:
    """Give a short twin run the loss curve of its standalone twin when their training losses agree
    bitwise on every step both ran; otherwise leave it with its own (short) curve."""
    by_key = {(r["config"], r["world"]): r for r in recs}
    for r in recs:
        twin = configs.REGISTRY[r["config"]].twin
        src = by_key.get((twin, r["world"])) if twin else None
        if src is None or len(r["train_loss"]) >= len(src["train_loss"]):
            continue
        n = len(r["train_loss"])
        r["twin_check"] = dict(twin=twin, steps_compared=n, identical=r["train_loss"] == src["train_loss"][:n])
        if r["twin_check"]["identical"]:
            r["evals"], r["curve_from"] = src["evals"], twin


def rows_from(recs: list[dict], target: float) -> list[dict]:
    borrow_twin_curves(recs)
    rows = []
    for r in recs:
        floor = [w for w in r["windows"] if not w["rate_bps"]]  # run.py --floor: timed unshaped window
        free = statistics.median(floor[0]["step_s"] if floor else (r["free_step_s"][3:] or r["free_step_s"]))
        stt = steps_to_target(r["evals"], target)
        warm = {w["rate_bps"]: statistics.median(w["step_s"]) for w in r["windows"] if w.get("phase") == "warmup"}
        uncompressed = r.get("uncompressed_steps", 0)
        for w in steady_windows(r):
            if not w["rate_bps"]:
                continue
            med = statistics.median(w["step_s"])
            warm_s = warm.get(w["rate_bps"])
            measured = w["tx_bytes"] / (w["steps"] * r["world"])
            rows.append(dict(
                config=r["config"], label=configs.REGISTRY[r["config"]].label, world=r["world"],
                rate=netns.format_rate(w["rate_bps"]), rate_bps=w["rate_bps"], n_params=r["n_params"],
                bytes_measured=measured, bytes_model=r["model_bytes_per_rank"],
                bytes_library=w.get("library_sent_per_rank"), measured_over_model=measured / r["model_bytes_per_rank"],
                step_s=med, step_s_mean=sum(w["step_s"]) / len(w["step_s"]), step_s_min=min(w["step_s"]),
                step_s_max=max(w["step_s"]), timed_steps=w["steps"], free_step_s=free,
                comm_fraction=max(0.0, 1 - free / med), tcp_retrans=w["tcp_retrans"], qdisc_drops=w["qdisc_drops"],
                steps_to_target=stt, uncompressed_steps=uncompressed, warmup_step_s=warm_s,
                time_to_target_s=time_to_target(stt, med, uncompressed, warm_s),
                time_to_target_steady_s=time_to_target(stt, med),
                final_val_loss=r["evals"][-1][1], final_step=r["evals"][-1][0],
                replicas_identical=r.get("replicas_identical"), curve_from=r.get("curve_from", ""),
                run_id=r.get("run_id"), leo_dist_sha256=r.get("leo_dist_sha256"), wall_s=r.get("wall_s")))
    base = {(x["world"], x["rate"]): x for x in rows if x["config"] == BASELINE}
    for x in rows:
        b = base.get((x["world"], x["rate"]))
        x["bytes_vs_ddp"] = x["bytes_measured"] / b["bytes_measured"] if b else None
        x["speedup_vs_ddp"] = b["step_s"] / x["step_s"] if b else None
    return rows


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


COLUMNS = [("config", "config", "s"), ("W", "world", "d"), ("rate", "rate", "s"),
           ("MB/rank/step wire", "bytes_measured", "MB"), ("model", "bytes_model", "MB"), ("×DDP bytes", "bytes_vs_ddp", ".3f"),
           ("step s", "step_s", ".2f"), ("×DDP speed", "speedup_vs_ddp", ".2f"), ("comm %", "comm_fraction", "%"),
           ("warm-up step s", "warmup_step_s", ".2f"), ("steps→tgt", "steps_to_target", ".0f"),
           ("s→tgt", "time_to_target_s", ".0f"),
           ("final loss", "final_val_loss", ".3f"), ("retx", "tcp_retrans", "d")]


def table(rows: list[dict], markdown: bool = False) -> str:
    def cell(x, key, spec):
        v = x[key]
        if spec == "MB":
            return _fmt(None if v is None else v / 1e6, ".2f")
        if spec == "%":
            return _fmt(None if v is None else 100 * v, ".0f")
        return _fmt(v, spec)
    head = [c[0] for c in COLUMNS]
    body = [[cell(x, k, s) for _, k, s in COLUMNS] for x in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with its number and verdict."""
    out = []
    find = {(x["config"], x["world"], x["rate"]): x for x in rows}
    worlds = sorted({x["world"] for x in rows})
    rates = sorted({x["rate"] for x in rows}, key=netns.parse_rate)
    for world in worlds:
        for name, limit in (("leo_lion_fp32", 0.55), ("leo_lion_bf16", 0.28), ("leo_lion_fp32_ddp", 0.55),
                            ("leo_lion_bf16_ddp", 0.28)):
            vals = [find[(name, world, r)]["bytes_vs_ddp"] for r in rates if (name, world, r) in find]
            vals = [v for v in vals if v is not None]
            if vals:
                v = max(vals)
                out.append(f"bytes {name} W={world}: {v:.3f}× DDP fp32 (target ≤ {limit}) — "
                           f"{'MET' if v <= limit else 'MISSED'}")
        leo = [find[(n, world, r)]["bytes_vs_ddp"] for n in ("leo_leo_bf16", "leo_leo_fp32") for r in rates
               if (n, world, r) in find and find[(n, world, r)]["bytes_vs_ddp"] is not None]
        if leo:
            out.append(f"bytes ShardedLeo exact matrices W={world}: {max(leo):.3f}× DDP fp32 (no target; reported)")
    slow = rates[0] if rates else None
    for world in worlds:
        me = find.get(("leo_lion_bf16", world, slow))
        if me is None:
            continue
        if me["speedup_vs_ddp"] is not None:
            out.append(f"step time {slow} W={world}: ShardedLion bf16 {me['step_s']:.2f}s vs DDP+AdamW "
                       f"{me['step_s'] * me['speedup_vs_ddp']:.2f}s = {me['speedup_vs_ddp']:.2f}× faster "
                       f"(target ≥ 3×{' at W=4' if world == 4 else ', informational'}) — "
                       f"{'MET' if me['speedup_vs_ddp'] >= 3 else 'MISSED'}")
        for other in ("ddp_lion_fp16", "zero_lion"):
            o = find.get((other, world, slow))
            if o:
                out.append(f"step time {slow} W={world}: ShardedLion bf16 {me['step_s']:.2f}s vs {other} "
                           f"{o['step_s']:.2f}s ({o['step_s'] / me['step_s']:.2f}×) — "
                           f"{'AHEAD' if me['step_s'] < o['step_s'] else 'BEHIND'}")
    for world in worlds:
        for rate in rates:
            cand = [x for x in rows if x["world"] == world and x["rate"] == rate]
            reached = sorted((x for x in cand if x["time_to_target_s"] is not None), key=lambda x: x["time_to_target_s"])
            if not cand:
                continue
            leo = [x for x in reached if configs.REGISTRY[x["config"]].leo_dist]
            if not reached:
                out.append(f"time to target {rate} W={world}: no configuration reached the target")
                continue
            best = reached[0]
            if leo and leo[0] is best:
                runner = reached[1] if len(reached) > 1 else None
                out.append(f"time to target {rate} W={world}: leo_dist first ({best['config']} "
                           f"{best['time_to_target_s']:.0f}s" + (f"; next {runner['config']} {runner['time_to_target_s']:.0f}s, "
                           f"{runner['time_to_target_s'] / best['time_to_target_s']:.2f}×)" if runner else ")") + " — MET")
            elif leo:
                out.append(f"time to target {rate} W={world}: {best['config']} first ({best['time_to_target_s']:.0f}s); "
                           f"best leo_dist {leo[0]['config']} {leo[0]['time_to_target_s']:.0f}s, "
                           f"{leo[0]['time_to_target_s'] / best['time_to_target_s']:.2f}× slower — MISSED")
            else:
                out.append(f"time to target {rate} W={world}: {best['config']} first; no leo_dist configuration "
                           "reached the target — MISSED")
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plots(out: str, rows: list[dict], recs: list[dict], fit_rows: list[dict], proj: list[dict], target: float) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    made = []
    worlds = sorted({x["world"] for x in rows}, reverse=True)
    rates = sorted({x["rate"] for x in rows}, key=netns.parse_rate)
    names = list(dict.fromkeys(x["config"] for x in rows))
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(configs.REGISTRY)}

    fig, axes = plt.subplots(len(worlds), len(rates), figsize=(5.5 * len(rates), 3.8 * len(worlds)), squeeze=False)
    for i, world in enumerate(worlds):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            sel = [x for x in rows if x["world"] == world and x["rate"] == rate]
            ax.barh([x["config"] for x in sel], [x["step_s"] for x in sel], color=[colors[x["config"]] for x in sel])
            for k, x in enumerate(sel):
                ax.text(x["step_s"], k, f" {x['step_s']:.2f}s", va="center", fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"median step time, W={world}, {rate}")
            ax.set_xlabel("seconds")
            ax.margins(x=0.2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "step_time.png"), dpi=110)
    plt.close(fig)
    made.append("step_time.png")

    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4), squeeze=False)
    for i, world in enumerate(worlds):
        ax = axes[0][i]
        sel = [x for x in rows if x["world"] == world and x["rate"] == rates[0]]
        ys = range(len(sel))
        ax.barh([y - 0.2 for y in ys], [x["bytes_measured"] / 1e6 for x in sel], height=0.4, label="measured (loopback tx)")
        ax.barh([y + 0.2 for y in ys], [x["bytes_model"] / 1e6 for x in sel], height=0.4, label="cost model")
        ax.set_yticks(list(ys), [x["config"] for x in sel])
        ax.invert_yaxis()
        ax.set_xlabel("MB sent per rank per step")
        ax.set_title(f"bytes on the wire, W={world}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bytes.png"), dpi=110)
    plt.close(fig)
    made.append("bytes.png")

    slow = rates[0]
    fig, axes = plt.subplots(len(worlds), 2, figsize=(12, 4 * len(worlds)), squeeze=False)
    med = {(x["config"], x["world"]): x["step_s"] for x in rows if x["rate"] == slow}
    for i, world in enumerate(worlds):
        for r in (r for r in recs if r["world"] == world):
            steps, losses = zip(*r["evals"])
            c = colors[r["config"]]
            axes[i][0].plot(steps, losses, label=r["config"], color=c)
            if (r["config"], world) in med:
                axes[i][1].plot([s * med[(r["config"], world)] / 60 for s in steps], losses, label=r["config"], color=c)
        for k, xl in ((0, "step"), (1, f"minutes at the median {slow} step time")):
            ax = axes[i][k]
            ax.axhline(target, color="grey", ls=":", lw=1)
            ax.set_xlabel(xl)
            ax.set_ylabel("validation loss")
            ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
            ax.set_title(f"W={world}" + ("" if k == 0 else f", {slow}"))
        axes[i][1].set_xscale("log")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)
    made.append("loss.png")

    if proj:
        schemes = [k for k in proj[0] if k in configs.REGISTRY]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, (model, link) in zip(axes, (("7B", 100.0), ("70B", 400.0))):
            sel = [p for p in proj if p["model"] == model and p["link_gbit"] == link]
            for s in schemes:
                ax.plot([p["world"] for p in sel], [p[s] for p in sel], marker="o", label=s, color=colors[s])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("ranks W")
            ax.set_ylabel("communication per step, s")
            ax.set_title(f"{model} parameters, {link:.0f} Gbit/s per rank (projection)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "projection.png"), dpi=110)
        plt.close(fig)
        made.append("projection.png")

    if fit_rows:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for fr in fit_rows:
            ax.scatter(fr["measured_s"], fr["pred_fit_s"], color=colors[fr["config"]], s=18,
                       marker="o" if fr["world"] == max(worlds) else "s")
        lim = [min(fr["measured_s"] for fr in fit_rows) * 0.8, max(fr["measured_s"] for fr in fit_rows) * 1.2]
        ax.plot(lim, lim, color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured median step time, s")
        ax.set_ylabel("model (fitted κ), s")
        ax.set_title("latency–bandwidth model vs measurement")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "model_check.png"), dpi=110)
        plt.close(fig)
        made.append("model_check.png")
    return made


def build(out: str, target: float, only_run: str | None = None) -> list[dict]:
    recs = load(out, only_run)
    if not recs:
        print(f"no results under {out}/raw")
        return []
    rows = rows_from(recs, target)
    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "curves.csv"), [dict(config=r["config"], world=r["world"], step=s, val_loss=l)
                                                 for r in recs for s, l in r["evals"]])
    points = [project.Point(x["config"], x["world"], x["rate_bps"], x["step_s"], x["free_step_s"], x["bytes_model"])
              for x in rows]
    kappas, fit_rows = project.fit(points)
    write_csv(os.path.join(out, "projection_fit.csv"), fit_rows)
    # One scheme per distinct byte pattern: the DDP-hook variants send what their standalone twins send.
    names = [n for n in dict.fromkeys(x["config"] for x in rows) if not n.endswith("_ddp")]
    names += [n for n, c in configs.REGISTRY.items() if c.unavailable() and n not in names]
    proj = project.project(names)
    write_csv(os.path.join(out, "projection.csv"), proj)
    made = plots(out, rows, recs, fit_rows, proj, target)
    verdicts = targets(rows)

    m = recs[0].get("machine", {})
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Slow-link results ({recs[0]['preset']} preset, {recs[0]['n_params']:,} parameters, "
                f"batch {recs[0]['batch_size']}/rank, {recs[0]['steps']} steps, target loss {target})\n\n")
        f.write(f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, Linux {m.get('kernel', '?')}, "
                f"torch {m.get('torch', '?')}; run(s) {sorted({r.get('run_id') for r in recs})}\n\n")
        f.write(table(rows, markdown=True) + "\n\n## Targets\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n\n")
        checks = [r for r in recs if "twin_check" in r]
        if checks:
            f.write("## DDP-hook variants\n\n")
            for r in checks:
                c = r["twin_check"]
                f.write(f"- {r['config']} W={r['world']}: training losses of its {c['steps_compared']} steps "
                        f"{'bitwise equal to' if c['identical'] else 'DIFFER from'} {c['twin']}'s"
                        f"{'; loss curve taken from ' + c['twin'] if c['identical'] else ''}\n")
            f.write("\n")
        f.write("## Model fit (κ per scheme)\n\n| scheme | κ (all points) | median |err| ideal (κ=1) | "
                "median |err| fitted | median |err| holdout |\n|---|---|---|---|---|\n")
        for name, k in kappas.items():
            sel = [r for r in fit_rows if r["config"] == name]
            f.write(f"| {name} | {k:.3f} | {project.summarize_errors(sel, 'err_ideal'):.1%} | "
                    f"{project.summarize_errors(sel, 'err_fit'):.1%} | {project.summarize_errors(sel, 'err_holdout'):.1%} |\n")
        f.write("\n## Projection: communication per step, seconds (κ = 1, α = 10 µs)\n\n")
        head = ["model", "params", "Gbit/s", "W"] + names
        f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for p in proj:
            f.write(f"| {p['model']} | {p['params'] / 1e9:.2f}B | {p['link_gbit']:.0f} | {p['world']} | "
                    + " | ".join(f"{p[n]:.3g}" for n in names) + " |\n")
    print()
    print(f"results in {out}: results.csv curves.csv projection.csv projection_fit.csv summary.md " + " ".join(made))
    print("\nmodel fit κ: " + ", ".join(f"{k}={v:.2f}" for k, v in kappas.items()))
    print("\n".join(verdicts))
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="rebuild the slow-link report from raw/")
    ap.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "docs", "results",
                                                           "slow_link"))
    ap.add_argument("--target-loss", type=float, default=configs.TARGET_LOSS)
    ap.add_argument("--run", default=None, help="only this run id")
    a = ap.parse_args()
    build(a.out, a.target_loss, a.run)
