#!/usr/bin/env python
"""Slow-interconnect benchmark: leo_dist against DDP, ZeRO and PowerSGD on a shaped link.

    sudo .venv/bin/python benchmarks/slow_link/run.py                 # the full suite (~40 min, 2 cores)
    sudo .venv/bin/python benchmarks/slow_link/run.py --quick         # smoke run, ~3 min
    sudo .venv/bin/python benchmarks/slow_link/run.py --configs ddp_adamw,leo_lion_bf16 --world-sizes 4 \
        --rates 100mbit

What happens: the driver creates a network namespace (``leo_slow_<pid>``) with its loopback up,
and for every world size W and configuration runs ``torchrun --nproc-per-node W worker.py``
inside it (``ip netns exec``). Each run trains ``--steps`` steps on the unshaped loopback (the
loss curve), and at step ``--window-at`` times ``--timed-steps`` steps at each ``--rates`` entry,
the loopback shaped with tc, counting the bytes on it (see worker.py and netns.py); a
configuration that starts uncompressed is also timed during that warm-up (``--warmup-window-at``). The
namespace is deleted on exit, also on error or Ctrl-C.

Ranks are CPU processes with ``OMP_NUM_THREADS=1``: at W=4 on a 2-core machine two ranks share a
core, which slows compute (not the link) and is reported with the machine.

Outputs (``--out``, default docs/results/slow_link; ``--quick`` writes to a temporary
directory unless ``--out`` is given): ``raw/<config>_W<W>.json`` per run, ``results.csv``,
``curves.csv``, ``projection.csv``, ``projection_fit.csv``, PNG plots, ``summary.md``, and the
table, printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

import configs  # noqa: E402
import netns  # noqa: E402
import report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all",
                    help=f"comma-separated names, or 'all' (default set: {','.join(configs.default_names())}); "
                         f"known: {','.join(configs.REGISTRY)}")
    ap.add_argument("--world-sizes", default="4,2", help="comma-separated (default 4,2)")
    ap.add_argument("--rates", default="100mbit,1gbit", help="link rates, comma-separated (default 100mbit,1gbit)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per packet on the link (netem)")
    ap.add_argument("--steps", type=int, default=80, help="training steps per run: the fixed step budget")
    ap.add_argument("--timed-steps", type=int, default=5, help="steps timed at each rate (default 5)")
    ap.add_argument("--window-at", type=int, default=12,
                    help="first timed step (after DDP's bucket rebuild and PowerSGD's warm-up; default 12)")
    ap.add_argument("--warmup-window-at", type=int, default=2,
                    help="first step of the warm-up windows: a configuration that runs its first steps "
                         "uncompressed (PowerSGD, the 1-bit modes) is also timed there, at every rate, so that "
                         "time to target counts those steps at their own speed (default 2: after DDP's first "
                         "step; 0: none)")
    ap.add_argument("--warmup-timed-steps", type=int, default=4,
                    help="steps per rate of a warm-up window, at most (they end within the warm-up; default 4)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--preset", default="10m", help="launch/gpt.py model preset (default 10m)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-loss", type=float, default=None,
                    help=f"validation loss for 'time to target' (default: {configs.TARGET_LOSS}; --quick: 3.6)")
    ap.add_argument("--out", default=None, help="output directory (default docs/results/slow_link)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table, CSVs and plots from raw/")
    ap.add_argument("--full-twins", action="store_true",
                    help="train DDP-hook variants for the whole budget too, instead of borrowing the loss curve "
                         "of their bitwise-identical standalone twin (checked on the steps both ran)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny model, W=2, 16 steps, 2 timed steps per rate")
    ap.add_argument("--floor", action="store_true",
                    help="also time a window on the unshaped loopback first (the compute floor; docs/overlap.md)")
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds before one torchrun is killed")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.timed_steps, args.window_at, args.eval_every = "tiny", 16, 2, 12, 8
        args.warmup_timed_steps = 2
        if args.world_sizes == "4,2":
            args.world_sizes = "2"
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="slow_link_quick_")
    if args.target_loss is None:
        args.target_loss = 3.6 if args.quick else configs.TARGET_LOSS
    if args.out is None:
        args.out = os.path.join(ROOT, "docs", "results", "slow_link")
    args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w]
    args.rates = [netns.parse_rate(r) for r in args.rates.split(",") if r]
    if any(w < 2 for w in args.world_sizes):
        ap.error("--world-sizes: each must be >= 2 (there is no link at W=1)")
    if args.window_at + args.timed_steps * (len(args.rates) + args.floor) - 1 > args.steps:
        ap.error(f"--steps {args.steps} is too short for the timed windows starting at step {args.window_at}")
    if args.warmup_window_at and args.warmup_window_at + args.warmup_timed_steps * len(args.rates) > args.window_at:
        ap.error(f"--warmup-window-at {args.warmup_window_at} with --warmup-timed-steps {args.warmup_timed_steps}: "
                 f"the warm-up windows must end before --window-at {args.window_at}")
    return args


def machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), kernel=platform.release(), python=platform.python_version(),
                torch=torch.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))


def run_one(ns: netns.Namespace, cfg: configs.Config, world: int, args, raw_dir: str) -> dict | None:
    out = os.path.join(raw_dir, f"{cfg.name}_W{world}.json")
    windows = ",".join((["none"] if args.floor else []) + [netns.format_rate(r) for r in args.rates])
    windows = ",".join(f"{w}:{args.timed_steps}" for w in windows.split(","))
    steps = args.steps
    if cfg.twin and cfg.twin in args.ran.get(world, ()) and not args.full_twins:
        steps = args.window_at + args.timed_steps * (len(args.rates) + args.floor) - 1
    cmd = ns.exec_prefix() + [
        "env", "OMP_NUM_THREADS=1", "GLOO_SOCKET_IFNAME=lo",
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        os.path.join(HERE, "worker.py"), "--config", cfg.name, "--preset", args.preset,
        "--batch-size", str(args.batch_size), "--steps", str(steps), "--eval-every", str(args.eval_every),
        "--seed", str(args.seed), "--window-at", str(args.window_at), "--windows", windows,
        "--warmup-window-at", str(args.warmup_window_at), "--warmup-timed-steps", str(args.warmup_timed_steps),
        "--delay-ms", str(args.delay_ms), "--out", out + ".tmp"]
    netns.unshape(ns.name)  # a run killed mid-window must not leave its successor shaped
    t0 = time.time()
    log_path = os.path.join(raw_dir, f"{cfg.name}_W{world}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[") and "] " in line and not line.startswith("[W") and not line.startswith("[rank"):
                    print("   ", line.rstrip(), flush=True)
            proc.wait(timeout=args.run_timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)  # our own torchrun and its ranks, nothing else
            proc.wait()
            raise
    rec = None
    try:
        with open(out + ".tmp") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        pass
    if rec is None:
        print(f"    FAILED ({proc.returncode}); log: {log_path}", flush=True)
        with open(log_path) as f:
            errors = [ln.strip() for ln in f if "Error" in ln or "error" in ln][-3:]
        for ln in errors:
            print("     ", ln[:300])
        return None
    if proc.returncode != 0:
        # Rank 0 writes its file after the last collective, so the measurement is complete; what
        # failed is teardown (seen with the PowerSGD hook's state at destroy_process_group).
        print(f"    note: torchrun exited {proc.returncode} after the run completed; log: {log_path}", flush=True)
        rec["exit_code"] = proc.returncode
    rec.update(wall_s=time.time() - t0, run_id=args.run_id, machine=args.machine, link_delay_ms=args.delay_ms)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    os.remove(out + ".tmp")
    return rec


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> None:
    args = parse_args(argv)
    raw_dir = os.path.join(args.out, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    if args.report_only:
        report.build(args.out, args.target_loss)
        return
    netns.require_root()
    chosen = configs.get(None if args.configs == "all" else args.configs)
    runnable = []
    for cfg in chosen:
        why = cfg.unavailable()
        if why:
            print(f"skipping {cfg.name}: {why}")
        else:
            runnable.append(cfg)
    args.run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    args.machine = machine()
    args.ran = {}
    with open(os.path.join(args.out, "command.txt"), "a") as f:
        f.write(f"{args.run_id}: {' '.join(sys.argv)}\n")

    # SIGTERM (e.g. from timeout) must unwind through the namespace's finally like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.time()
    with netns.Namespace() as ns:
        print(f"namespace {ns.name}; rates {[netns.format_rate(r) for r in args.rates]}, delay {args.delay_ms} ms; "
              f"preset {args.preset}, batch {args.batch_size}/rank, {args.steps} steps; out {args.out}", flush=True)
        for world in args.world_sizes:
            for cfg in runnable:
                print(f"== {cfg.name} W={world} ({time.time() - t_start:.0f}s elapsed)", flush=True)
                if run_one(ns, cfg, world, args, raw_dir) is not None:
                    args.ran.setdefault(world, set()).add(cfg.name)
    print(f"suite finished in {time.time() - t_start:.0f}s; namespace removed", flush=True)
    report.build(args.out, args.target_loss, only_run=args.run_id)


if __name__ == "__main__":
    main()
