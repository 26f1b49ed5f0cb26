"""Bytes a training step really puts on the wire: DDP against leo_dist, counted by the kernel.

Ranks run on gloo inside a private network namespace, so everything they send crosses that
namespace's loopback and nothing else does; ``/proc/net/dev``'s ``lo`` transmit counter, read
by rank 0 between barriers, counts each byte once (loopback counts a packet once as sent and once
as received: we use the sent side). Needs root (``ip netns``).

    sudo .venv/bin/python benchmarks/wire_bytes.py --world 2 4 --model gpt10m

prints a table and writes ``docs/wire_bytes.md``. ``--probe`` is the per-namespace worker.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "slow_link"))
from netns import Namespace, read_counters  # noqa: E402  (the slow-link harness's namespace helpers)
# <optimizer>_<grad_comm>[_u1bit|_ubf16]: u1bit sends Leo's matrix updates as row-scaled signs, ubf16
# rounded to bfloat16
MODES = ("ddp", "lion_fp32", "lion_bf16", "lion_1bit", "leo_fp32", "leo_bf16", "leo_fp32_u1bit", "leo_1bit_u1bit",
         "leo_bf16_ubf16", "leo_bf16_u1bit")


def lo_tx_bytes() -> int:
    return read_counters("lo").tx_bytes


def build(model: str, rank: int):
    """(module, loss function) with the same initial weights on every rank and rank-local data."""
    torch.manual_seed(0)
    if model == "mlp1m":
        # shapes whose shard boundaries fall inside rows
        net = torch.nn.Sequential(torch.nn.Linear(500, 999), torch.nn.Linear(999, 500), torch.nn.Linear(500, 3))
        x = torch.randn(8, 500, generator=torch.Generator().manual_seed(rank))
        return net, lambda m: m(x).square().mean()
    if model == "gpt10m":
        sys.path.insert(0, ROOT)
        from launch.gpt import GPT, GPTConfig, PRESETS, get_batch, load_corpus

        net = GPT(GPTConfig(**PRESETS["10m"]))
        train, _, _ = load_corpus(200_000)
        x, y = get_batch(train, 2, net.cfg.block_size, torch.Generator().manual_seed(rank))
        return net, lambda m: m(x, y)[1]
    raise ValueError(f"unknown model {model!r}")


def probe_worker(rank: int, world: int, mode: str, model: str, steps: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        import leo_dist

        net, loss_fn = build(model, rank)
        if mode == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(net)
            opt = leo_dist.Lion(net.parameters())
        else:
            kind, wire, *rest = mode.split("_")
            # no fp32 warm-up for 1-bit gradients: the counted steps must be compressed ones
            if kind == "lion":
                opt = leo_dist.ShardedLion(net.parameters(), grad_comm=wire, grad_comm_warmup=0)
            else:
                opt = leo_dist.ShardedLeo(leo_dist.leo_param_groups(net), grad_comm=wire, grad_comm_warmup=0,
                                          update_comm={"u1bit": "1bit", "ubf16": "bf16"}.get("".join(rest), "exact"))

        def one_step():
            opt.zero_grad()
            loss_fn(net).backward()
            opt.step()

        one_step()  # connection set-up and DDP's bucket rebuild stay out of the count
        dist.barrier()
        before = lo_tx_bytes()
        for _ in range(steps):
            one_step()
        dist.barrier()
        after = lo_tx_bytes()
        if rank == 0:
            model_bytes = None
            if mode != "ddp":
                model_bytes = opt.comm_stats()["last_step"]["sum"]["sent"] * world
            out.put(((after - before) / steps, model_bytes))
    finally:
        dist.destroy_process_group()


def probe(world: int, mode: str, model: str, steps: int) -> None:
    port = 20000 + os.getpid() % 20000
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=probe_worker, args=(r, world, mode, model, steps, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    wire, modelled = out.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    n = sum(p.numel() for p in build(model, 0)[0].parameters())
    print(f"WIRE {mode} {wire:.0f} {n} {modelled if modelled is not None else -1}")


def in_netns(world: int, mode: str, model: str, steps: int, netns: str) -> tuple[float, int, int]:
    """Run one probe in ``netns``; returns (bytes on the wire per step, parameters, modelled bytes or -1)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__), "--probe",
           "--world", str(world), "--modes", mode, "--model", model, "--steps", str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    lines = [l for l in run.stdout.splitlines() if l.startswith("WIRE ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({mode}, W={world}):\n{run.stdout}\n{run.stderr}")
    _, _, wire, n, modelled = lines[-1].split()
    return float(wire), int(n), int(modelled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--model", default="gpt10m", choices=["mlp1m", "gpt10m"])
    ap.add_argument("--steps", type=int, default=3, help="steps counted (after one warm-up step)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "wire_bytes.md"))
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.world[0], args.modes[0], args.model, args.steps)
        return
    rows = []
    with Namespace(f"leo_wire_{os.getpid()}") as space:
        ns = space.name
        for w in args.world:
            base = None
            for mode in args.modes:
                wire, n, modelled = in_netns(w, mode, args.model, args.steps, ns)
                base = wire if mode == "ddp" else base
                rows.append((w, mode, n, wire, modelled, wire / base if base else float("nan")))
                print(f"W={w} {mode:10s} {wire / 1e6:9.2f} MB/step" + (f"  {wire / base:.3f}x DDP" if base else ""),
                      flush=True)
    head = ("| W | mode | params | bytes on the wire / step (all ranks) | leo_dist cost model | vs DDP fp32 |\n"
            "|---|---|---|---|---|---|")
    body = "\n".join(f"| {w} | {m} | {n:,} | {wire:,.0f} | {'' if mod < 0 else f'{mod:,}'} | {r:.3f} |"
                     for w, m, n, wire, mod, r in rows)
    text = (f"# Bytes on the wire per step\n\nModel `{args.model}`, gloo on the loopback of a private network "
            f"namespace, lo's transmit counter, mean of {args.steps} steps after one warm-up.\n"
            f"Command: `.venv/bin/python benchmarks/wire_bytes.py --world {' '.join(map(str, args.world))} "
            f"--model {args.model}` (as root). DDP runs its default fp32 all-reduce (gloo ring).\n\n"
            f"{head}\n{body}\n")
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
