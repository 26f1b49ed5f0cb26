"""What the lossy 1-bit modes cost in loss, and what they save in bytes.

Runs the demo (``launch/train.py``) under ``torchrun --standalone`` on gloo for each
configuration, same seed, data and step budget, and tabulates the final train and validation loss
next to the bytes each rank sent per step (from ``opt.comm_stats()``, after the 1-bit warm-up)
relative to DDP's fp32 all-reduce. Losses do not depend on the machine's load; times do, and are
not reported here.

    .venv/bin/python benchmarks/onebit_convergence.py --world 2 --steps 300

writes ``docs/onebit_convergence.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> train.py flags; the exact configuration of each optimizer comes first
CONFIGS = {
    "leo exact": ["--optimizer", "sharded_leo"],
    "leo update_comm=1bit": ["--optimizer", "sharded_leo", "--update-comm", "1bit"],
    "leo grad_comm=1bit": ["--optimizer", "sharded_leo", "--grad-comm", "1bit"],
    "leo grad+update 1bit": ["--optimizer", "sharded_leo", "--grad-comm", "1bit", "--update-comm", "1bit"],
    "lion exact": ["--optimizer", "sharded_lion"],
    "lion grad_comm=1bit": ["--optimizer", "sharded_lion", "--grad-comm", "1bit"],
}


def run(name: str, flags: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
               f"--nproc-per-node={args.world}", os.path.join(ROOT, "launch", "train.py"),
               "--preset", args.preset, "--steps", str(args.steps), "--seed", str(args.seed),
               "--eval-interval", str(args.steps), "--log-interval", "10", "--no-progress",
               "--metrics-file", metrics, *flags]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        rows = [json.loads(line) for line in open(metrics)]
    train = [r for r in rows if r["kind"] == "train"]
    summary = next(r for r in rows if r["kind"] == "summary")
    # bytes after the warm-up: the last logged window
    last = train[-1]
    return dict(config=name, final_loss=summary["final_loss"], val_loss=summary["val_loss"],
                sent_per_step=last["sent_bytes"], ratio_vs_ddp=last["sent_bytes"] / last["ddp_fp32_bytes"],
                losses=[(r["step"], r["loss"]) for r in train])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "onebit_convergence"))
    args = ap.parse_args()
    results = []
    for name in args.configs:
        r = run(name, CONFIGS[name], args)
        results.append(r)
        print(f"{name:24s} loss {r['final_loss']:.4f}  val {r['val_loss']:.4f}  "
              f"sent {r['sent_per_step'] / 1e3:9.1f} KB/step/rank  {r['ratio_vs_ddp']:.3f}x DDP", flush=True)
    cmd = (f".venv/bin/python benchmarks/onebit_convergence.py --world {args.world} --steps {args.steps} "
           f"--preset {args.preset} --seed {args.seed}")
    lines = [f"# Convergence cost of the 1-bit modes\n",
             f"Demo model `{args.preset}`, W={args.world} on gloo, {args.steps} steps, seed {args.seed}, the demo's "
             f"default learning rates and cosine schedule; 1-bit gradients start after 10 fp32 warm-up steps. "
             f"Bytes: sent per rank per step after warm-up (`opt.comm_stats()`), against DDP's fp32 ring "
             f"all-reduce `2(W-1)/W·4N`.\n", f"Command: `{cmd}`\n",
             "| configuration | final train loss | val loss | sent / step / rank | vs DDP fp32 |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['final_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['sent_per_step'] / 1e3:,.1f} KB | {r['ratio_vs_ddp']:.3f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(command=cmd, results=results), f, indent=1)


if __name__ == "__main__":
    main()
