"""Run inside a private network namespace: bytes that W gloo ranks put on its loopback per step.

Usage: python wire_probe.py WORLD MODE [STEPS]   (MODE: ddp | lion_fp32 | lion_bf16)
Prints one line ``WIRE <mode> <bytes per step>`` (rank 0; lo's tx counter, so each byte once).
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL_NUMEL = 1_000_000


def lo_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    raise RuntimeError("no lo interface")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # ~1M parameters in shapes whose shard boundaries fall inside rows
    return torch.nn.Sequential(torch.nn.Linear(500, 999), torch.nn.Linear(999, 500), torch.nn.Linear(500, 3))


def worker(rank: int, world: int, mode: str, steps: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import leo_dist

        net = model()
        x = torch.randn(8, 500, generator=torch.Generator().manual_seed(rank))
        if mode == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=25)
            opt = leo_dist.Lion(net.parameters())
        else:
            opt = leo_dist.ShardedLion(net.parameters(), grad_comm=mode.split("_")[1])

        def one_step():
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()

        one_step()  # connections, DDP's bucket rebuild
        dist.barrier()
        before = lo_tx_bytes()
        for _ in range(steps):
            one_step()
        dist.barrier()
        after = lo_tx_bytes()
        if rank == 0:
            out.put((after - before) / steps)
    finally:
        dist.destroy_process_group()


def main() -> None:
    world, mode = int(sys.argv[1]), sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    port = 29000 + os.getpid() % 2000
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, mode, steps, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    value = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    n = sum(p.numel() for p in model().parameters())
    print(f"WIRE {mode} {value:.0f} {n}")


if __name__ == "__main__":
    main()
