#!/usr/bin/env python
"""CPU seconds per rank and step of a testbed configuration, with no link limit (diagnosis).

On the two-node testbed 4 ranks share 2 cores, so a step can be no shorter than the CPU time the
4 ranks spend on it, divided by 2, whatever the link. This measures that CPU time directly: all
ranks on one machine's loopback (no namespaces, no shaping, no root), the slow-link registry's
configuration by name, ``--steps`` timed steps after ``--warmup``; per rank the process CPU time
per step, and on rank 0 each thread's (main, the leo_dist sender, gloo's threads, from
``/proc/self/task``). ``--ranks-per-node G`` makes ``ranks_per_node="auto"`` configurations see G
ranks per node (it sets LOCAL_WORLD_SIZE and GROUP_RANK as torchrun would on G-rank nodes).

    .venv/bin/python benchmarks/topology/cpu_cost.py --configs ddp_lion_fp16,leo_lion_bf16_ddp,leo_lion_bf16_hier \\
        --batch-size 1 --out docs/results/topology/diagnosis/cpu_cost.md

Also ``--floor``: one rank alone, forward + backward only (the compute the testbed's 4 ranks
cannot get below: twice that per step on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks", "slow_link"), HERE]


def _thread_cpu() -> dict[tuple[str, str], float]:
    """(thread id, name) → CPU seconds so far, for every thread of this process; Python threads
    by their ``threading`` name (the OS name of all of them is the interpreter's), others (gloo's)
    by the OS name."""
    import threading
    named = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            text = open(f"/proc/self/task/{tid}/stat").read()
        except FileNotFoundError:  # the thread ended
            continue
        name = named.get(int(tid), text[text.index("(") + 1 : text.rindex(")")])
        fields = text[text.rindex(")") + 2 :].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def _model(preset: str):
    from launch.gpt import GPT, PRESETS, GPTConfig, load_corpus
    import torch
    train, _, vocab = load_corpus()
    cfg = GPTConfig(vocab_size=vocab, **PRESETS[preset])
    torch.manual_seed(0)
    return GPT(cfg), cfg, train


def floor(preset: str, batch: int, steps: int = 6) -> tuple[float, float]:
    """(forward, backward) seconds of one rank alone, one thread, medians of ``steps``."""
    import torch
    from launch.gpt import get_batch
    torch.set_num_threads(1)
    model, cfg, train = _model(preset)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        x, y = get_batch(train, batch, cfg.block_size, g)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        t1 = time.perf_counter()
        loss.backward()
        times.append((t1 - t0, time.perf_counter() - t1))
        model.zero_grad(set_to_none=True)
    times = times[2:]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def rank_main(args) -> None:
    """One rank under torchrun: prints one line per configuration on rank 0."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.ranks_per_node:
        os.environ["LOCAL_WORLD_SIZE"] = str(args.ranks_per_node)
        os.environ["GROUP_RANK"] = str(rank // args.ranks_per_node)
    import configs
    import topo_configs  # noqa: F401  (registers the topology configurations)
    from launch.gpt import get_batch
    cfg = configs.get([args.config])[0]
    model, gcfg, train = _model(args.preset)
    fwd, opt = cfg.build(model, world, configs.HYPER[cfg.family])
    gen = torch.Generator().manual_seed(rank)
    finish = getattr(opt, "synchronize", lambda: None)

    def step() -> None:
        x, y = get_batch(train, args.batch_size, gcfg.block_size, gen)
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    finish()
    dist.barrier()
    before, c0, t0 = _thread_cpu(), time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step()
    finish()
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    after = _thread_cpu()
    mine = torch.tensor([cpu])
    every = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        threads = sorted(((after[k] - before.get(k, 0.0)) / args.steps, k[1]) for k in after)
        busy = ", ".join(f"{name} {v:.3f}" for v, name in reversed(threads) if v >= 0.002)
        print(f"ROW|{cfg.name}|{wall:.3f}|{' / '.join(f'{e.item():.3f}' for e in every)}|{busy}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="ddp_lion_fp16,leo_lion_bf16_ddp,leo_lion_bf16_hier")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # one rank of one configuration
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--preset", default="10m")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--floor", action="store_true", help="one rank's forward + backward alone, then exit")
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()
    if args.floor:
        f, b = floor(args.preset, args.batch_size)
        print(f"preset {args.preset}, batch {args.batch_size}, one rank alone, 1 thread: forward {f:.3f} s, "
              f"backward {b:.3f} s; {args.nproc} ranks on {os.cpu_count()} cores: >= "
              f"{args.nproc * (f + b) / os.cpu_count():.3f} s per step")
        return
    if args.config:
        return rank_main(args)
    lines = ["| configuration | s/step (no link limit) | CPU s per rank and step | rank 0's threads, CPU s/step |",
             "|---|---|---|---|"]
    for name in args.configs.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               os.path.abspath(__file__), "--config", name, "--preset", args.preset,
               "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--ranks-per-node", str(args.ranks_per_node)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        rows = [line for line in out.stdout.splitlines() if line.startswith("ROW|")]
        if out.returncode or not rows:
            raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        _, cfg, wall, cpu, threads = rows[0].split("|")
        lines.append(f"| {cfg} | {wall} | {cpu} | {threads} |")
        print(lines[-1], flush=True)
    text = (f"preset {args.preset}, batch {args.batch_size} per rank, {args.nproc} ranks "
            f"({args.ranks_per_node} per node for ranks_per_node='auto'), {os.cpu_count()} cores, "
            f"{args.steps} timed steps after {args.warmup}\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
