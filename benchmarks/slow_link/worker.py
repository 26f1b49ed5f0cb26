#!/usr/bin/env python
"""One configuration's training run, under torchrun, inside the driver's namespace (see run.py).

The run trains ``--steps`` steps and evaluates the validation loss every ``--eval-every`` steps,
on an unshaped loopback: the loss curve does not depend on the link, and training at loopback
speed keeps the suite short. At step ``--window-at`` it runs one timed window per entry of
``--windows`` (e.g. ``100mbit:5,1gbit:5``): rank 0 shapes the loopback to that rate (it runs in
the namespace, as root), reads the interface counters, all ranks run K ordinary training steps,
then rank 0 reads the counters again and removes the shaping. Window steps are training steps
like the others, so the windows measure the very run whose loss curve is reported.

A lossy configuration that runs its first steps uncompressed (PowerSGD's 10 all-reduce steps,
the 1-bit modes' exact warm-up: ``configs.uncompressed_steps``) also gets, with
``--warmup-window-at S``, the same shaped windows from step S, shortened to end within that
warm-up and marked ``phase: "warmup"``, so that time to target can count those steps at their
own speed.

Rank 0 writes one JSON file (``--out``) with everything the driver needs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import configs  # noqa: E402
import netns  # noqa: E402
from launch.gpt import GPT, PRESETS, GPTConfig, get_batch, load_corpus  # noqa: E402


def parse_windows(text: str) -> list[tuple[float, int]]:
    """``"none:5,100mbit:5"`` -> ``[(0.0, 5), (1e8, 5)]``; rate 0 ("none") is a window on the
    unshaped loopback: the compute floor, timed exactly like the shaped windows."""
    out = []
    for item in filter(None, text.split(",")):
        rate, _, k = item.partition(":")
        out.append((0.0 if rate == "none" else netns.parse_rate(rate), int(k or 5)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--preset", default="10m", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--lr-warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window-at", type=int, default=12)
    ap.add_argument("--windows", default="")
    ap.add_argument("--warmup-window-at", type=int, default=0,
                    help="first step of the warm-up windows of a configuration with uncompressed steps (0: none)")
    ap.add_argument("--warmup-timed-steps", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--no-shape", action="store_true", help="time the windows without touching tc (tests)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = configs.get([args.config])[0]
    why = cfg.unavailable()
    if why:
        raise SystemExit(f"configuration {cfg.name} cannot run: {why}")

    # The library may change between runs of a suite; name the exact code each run used.
    import hashlib
    import leo_dist
    pkg = os.path.dirname(leo_dist.__file__)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                digest.update(name.encode() + f.read())
    code_sha = digest.hexdigest()[:16]
    train_ids, val_ids, vocab = load_corpus()
    gcfg = GPTConfig(vocab_size=vocab, **PRESETS[args.preset])
    torch.manual_seed(args.seed)
    model = GPT(gcfg)
    shapes = configs.model_shapes(model)
    hyper = configs.HYPER[cfg.family]
    fwd, opt = cfg.build(model, world, hyper)
    base_lrs = [g["lr"] for g in opt.param_groups]

    def batch(step: int):
        # The batch of (seed, rank, step): identical in every configuration.
        g = torch.Generator().manual_seed((args.seed * 1_000_003 + rank) * 1_000_003 + step)
        return get_batch(train_ids, args.batch_size, gcfg.block_size, g)

    phases: list[tuple[float, float, float]] = []  # per step: forward, backward, step() seconds
    marks: list[tuple[float, float, float, float]] = []  # per step: perf_counter at its phase boundaries

    def train_step(step: int) -> float:
        factor = min(1.0, step / args.lr_warmup) if args.lr_warmup > 0 else 1.0
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        x, y = batch(step)
        t0 = time.perf_counter()
        _, loss = fwd(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        phases.append((t1 - t0, t2 - t1, t3 - t2))
        marks.append((t0, t1, t2, t3))
        return loss.item()

    @torch.no_grad()
    def evaluate() -> float:
        # The same validation batches at every world size, split across ranks.
        g = torch.Generator().manual_seed(10_000 + args.seed)
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(args.eval_batches):
            x, y = get_batch(val_ids, 16, gcfg.block_size, g)
            if i % world == rank:
                total[0] += model(x, y)[1].item()
                total[1] += 1
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    windows = parse_windows(args.windows)
    record = dict(config=cfg.name, world=world, preset=args.preset, n_params=shapes.numel,
                  batch_size=args.batch_size, steps=args.steps, seed=args.seed, delay_ms=args.delay_ms,
                  leo_dist_sha256=code_sha,
                  hyper={k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()},
                  train_loss=[], evals=[], free_step_s=[], windows=[])
    record["uncompressed_steps"] = configs.uncompressed_steps(cfg, opt)
    record["evals"].append((0, evaluate()))

    def timed_windows(step: int, wins: list[tuple[float, int]], phase: str) -> int:
        """Run ``wins`` from ``step`` (see the module docstring); returns the next step."""
        for rate, k in wins:
            k = min(k, args.steps - step + 1)
            if k <= 0:
                break
            # a streamed step (overlap_updates) is still sending after step() returns: every
            # window starts and ends with no step in flight, so its counters hold whole steps
            finish = getattr(opt, "synchronize", None)
            if finish is not None:
                finish()
            dist.barrier()
            if rank == 0:
                if rate and not args.no_shape:
                    netns.shape(rate, args.delay_ms)
                before = netns.read_counters()
            dist.barrier()
            times, t_prev = [], time.perf_counter()
            del phases[:], marks[:]
            for _ in range(k):
                record["train_loss"].append(train_step(step))
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
                step += 1
            if finish is not None:
                finish()
            dist.barrier()
            if rank == 0:
                delta = netns.read_counters() - before
                if rate and not args.no_shape:
                    netns.unshape()
                last = opt.comm_stats()["last_step"] if hasattr(opt, "comm_stats") else None
                stats = last and last["sum"]
                # the topology-aware exchange books its cross-node collectives as "<kind>:inter"
                inter = last and sum(v["sent"] for k, v in last.items() if k.endswith(":inter"))
                record["windows"].append(dict(rate_bps=rate, steps=k, first_step=step - k, phase=phase,
                                              step_s=times,
                                              forward_s=[ph[0] for ph in phases],
                                              backward_s=[ph[1] for ph in phases],
                                              opt_step_s=[ph[2] for ph in phases],
                                              step_marks=list(marks),
                                              tx_bytes=delta.tx_bytes, tx_packets=delta.tx_packets,
                                              tcp_retrans=delta.tcp_retrans, qdisc_drops=delta.qdisc_drops,
                                              library_sent_per_rank=stats and stats["sent"],
                                              library_inter_sent_per_rank=inter or None))
                med = [statistics.median(ph[i] for ph in phases) for i in range(3)]
                print(f"[{cfg.name} W={world}] {netns.format_rate(rate) if rate else 'unshaped'}"
                      f"{' (warm-up)' if phase == 'warmup' else ''}: median step "
                      f"{statistics.median(times):.3f}s (fwd {med[0]:.3f} bwd {med[1]:.3f} step {med[2]:.3f}), "
                      f"{delta.tx_bytes / k / world / 1e6:.2f} MB/rank/step "
                      f"on the wire, retrans {delta.tcp_retrans}", flush=True)
        return step

    starts = {args.window_at: (windows, "main")} if windows else {}
    warm, shaped = record["uncompressed_steps"], [rate for rate, _ in windows if rate]
    if args.warmup_window_at > 0 and warm and shaped:
        # every warm-up window ends by step `warm`, the last uncompressed one
        k = min(args.warmup_timed_steps, (warm - args.warmup_window_at + 1) // len(shaped))
        if k >= 1:
            if args.warmup_window_at + k * len(shaped) > args.window_at:
                raise SystemExit(f"--warmup-window-at {args.warmup_window_at}: the warm-up windows overlap "
                                 f"--window-at {args.window_at}")
            starts[args.warmup_window_at] = ([(rate, k) for rate in shaped], "warmup")
    step = 1
    while step <= args.steps:
        if step in starts:
            step = timed_windows(step, *starts.pop(step))
            continue
        t0 = time.perf_counter()
        record["train_loss"].append(train_step(step))
        record["free_step_s"].append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            record["evals"].append((step, evaluate()))
            if rank == 0:
                print(f"[{cfg.name} W={world}] step {step}: val {record['evals'][-1][1]:.4f}", flush=True)
        step += 1

    # a run whose last step was timed has not been evaluated since (the windows skip evaluations)
    if record["evals"][-1][0] != args.steps:
        record["evals"].append((args.steps, evaluate()))
    # Every configuration keeps identical replicas; check it, so a broken setup cannot pass unseen.
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        mine = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(flat.numel(), dtype=torch.float64)
                                                            .remainder(7919)).sum()])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
    record["replicas_identical"] = all(torch.equal(e, everyone[0]) for e in everyone)
    record["model_bytes_per_rank"] = cfg.model_bytes(shapes, world)
    record["phases"] = [vars(p) for p in cfg.cost(shapes, world)]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    dist.barrier()
    del fwd, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
