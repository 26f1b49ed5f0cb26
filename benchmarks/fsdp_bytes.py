"""Bytes per training step on the wire: FSDP2 + Leo against ShardedLeo and DDP, same model, gloo.

Each mode runs W ranks inside a private network namespace, so every byte they exchange crosses
that namespace's loopback and nothing else does; rank 0 reads ``lo``'s transmit counter from
``/proc/net/dev`` between barriers (loopback counts a packet once as sent: the total over ranks).
The barriers' own bytes are measured alone and subtracted. Needs root (``ip netns``)::

    .venv/bin/python benchmarks/fsdp_bytes.py --world 2 --steps 5

prints a markdown table (also written to ``--out`` when given). Columns: bytes on the wire per step
(all ranks), the ring cost model for the same collectives, and each rank's resident parameter +
gradient + momentum bytes after a step (what the modes trade bytes for). ``--inside`` is the
per-namespace worker.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_link"))
from netns import Namespace, read_counters  # noqa: E402  (the slow-link harness's namespace helpers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {
    "ddp": "DDP fp32 all-reduce + Leo (full momentum per rank)",
    "sharded_leo": "ShardedLeo, fp32 grads, exact updates (replicated params, 1-bit sign updates)",
    "sharded_leo_1bit": "ShardedLeo, fp32 grads, update_comm=1bit (2-D updates as bits too)",
    "sharded_leo_bf16": "ShardedLeo, bf16 grads, exact updates",
    "sharded_lion": "ShardedLion, fp32 grads: every update travels as sign bits (the 1-bit floor)",
    "fsdp_leo": "FSDP2 fully_shard + Leo, defaults (reshard after forward)",
    "fsdp_leo_a2a": "FSDP2 + Leo, AllToAllReduceScatter",
    "fsdp_leo_a2a_noreshard": "FSDP2 + Leo, AllToAllReduceScatter, reshard_after_forward=False",
    "fsdp_leo_a2a_bf16": "FSDP2 + Leo, AllToAllReduceScatter, bf16 param all-gather (MixedPrecisionPolicy)",
    "fsdp_leo_a2a_noreshard_bf16": "FSDP2 + Leo, AllToAllReduceScatter, no reshard, bf16 param all-gather",
}


def lo_tx() -> int:
    return read_counters("lo").tx_bytes


def build(rank: int):
    """An MLP of about 1.0M parameters whose row counts are not multiples of W; rank-local data."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(500, 999), nn.ReLU(), nn.Linear(999, 500), nn.ReLU(), nn.Linear(500, 3))
    x = torch.randn(16, 500, generator=torch.Generator().manual_seed(rank))
    return net, x


def _resident(tensors) -> int:
    out = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        out += t.numel() * t.element_size()
    return out


def worker(rank: int, world: int, mode: str, steps: int, port: int, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        import leo_dist
        import leo_dist.fsdp

        net, x = build(rank)
        n = sum(p.numel() for p in net.parameters())
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(net)
            opt = leo_dist.Leo(leo_dist.leo_param_groups(net))
        elif mode == "sharded_lion":
            model = net
            opt = leo_dist.ShardedLion(net.parameters())
        elif mode.startswith("sharded_leo"):
            model = net
            kw = {"sharded_leo": {}, "sharded_leo_1bit": {"update_comm": "1bit"},
                  "sharded_leo_bf16": {"grad_comm": "bf16"}}[mode]
            opt = leo_dist.ShardedLeo(leo_dist.leo_param_groups(net), **kw)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh("cpu", (world,))
            kw = dict(mesh=mesh, reshard_after_forward="noreshard" not in mode)
            if mode.endswith("bf16"):
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, **kw)
            fully_shard(net, **kw)
            if "a2a" in mode:
                for m in net.modules():
                    if hasattr(m, "set_custom_reduce_scatter") and any(True for _ in m.parameters(recurse=False)):
                        m.set_custom_reduce_scatter(leo_dist.fsdp.AllToAllReduceScatter())
            model = net
            # after sharding: the groups must hold FSDP2's DTensor parameters (ndim is the global one)
            opt = leo_dist.Leo(leo_dist.leo_param_groups(net))

        def step():
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        for _ in range(2):  # connection set-up, DDP's bucket rebuild: not counted
            step()
        dist.barrier()
        b0 = lo_tx()
        for _ in range(steps):
            dist.barrier()
        dist.barrier()
        b1 = lo_tx()
        for _ in range(steps):
            step()
            dist.barrier()
        dist.barrier()
        b2 = lo_tx()
        if mode.startswith("sharded"):
            momentum = [m for m in getattr(opt, "_momentum", [])]
            mine = opt.comm_stats()["last_step"]["sum"]["sent"]
        else:
            momentum = [s["exp_avg"] for s in opt.state.values()]
            mine = leo_dist.fsdp.comm_stats(opt)["last_step"].get("sum", {}).get("sent", 0) if mode != "ddp" else 0
        resident = _resident(list(net.parameters()) + [p.grad for p in net.parameters()] + momentum)
        stats = torch.tensor([float(mine), float(resident)])
        gathered = [torch.zeros(2) for _ in range(world)]
        dist.all_gather(gathered, stats)
        if rank == 0:
            q.put(dict(mode=mode, n=n, wire=((b2 - b1) - (b1 - b0)) / steps,
                       opt_sent=sum(float(g[0]) for g in gathered),
                       resident=max(float(g[1]) for g in gathered)))
    finally:
        dist.destroy_process_group()


def cost_model(mode: str, n: int, world: int, opt_sent: float) -> float:
    """Ring cost model, bytes per step summed over ranks (fp32 parameters of n elements).

    DDP: all-reduce 2(W−1)/W·4n per rank. FSDP2: each all-gather (W−1)/W·(param bytes) per rank,
    two per step when resharding after forward (forward and backward), one otherwise; the
    reduce-scatter (W−1)/W·4n per rank with the all-to-all, 2(W−1)/W·4n with gloo's own (it is an
    all-reduce in disguise, docs/design.md, phase 1). leo_dist's own collectives as leo_dist counts them.
    """
    f = (world - 1) / world
    if mode == "ddp":
        return world * 2 * f * 4 * n
    if mode.startswith("sharded"):
        return opt_sent
    gathers = 1 if "noreshard" in mode else 2
    param_bytes = 2 if mode.endswith("bf16") else 4
    rs = f * 4 * n if "a2a" in mode else 2 * f * 4 * n
    return world * (gathers * f * param_bytes * n + rs) + opt_sent


def inside(world: int, modes: list[str], steps: int) -> None:
    ctx = mp.get_context("spawn")
    for mode in modes:
        q = ctx.Queue()
        port = 21000 + (os.getpid() + hash(mode)) % 20000
        procs = [ctx.Process(target=worker, args=(r, world, mode, steps, port, q)) for r in range(world)]
        for p in procs:
            p.start()
        res = q.get(timeout=900)
        for p in procs:
            p.join(timeout=60)
        print("RESULT", res, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        inside(args.world, args.modes, args.steps)
        return
    if os.geteuid() != 0:
        raise SystemExit("counting bytes on the wire needs root (it creates a network namespace)")
    with Namespace(f"leo_fsdp_{os.getpid()}") as space:
        cmd = [*space.exec_prefix(), sys.executable, os.path.abspath(__file__), "--inside",
               "--world", str(args.world), "--steps", str(args.steps), "--modes", *args.modes]
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    results = [ast.literal_eval(line[len("RESULT "):]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or len(results) != len(args.modes):
        raise SystemExit(f"probe failed:\n{run.stdout}\n{run.stderr[-4000:]}")
    base = next((r["wire"] for r in results if r["mode"] == "ddp"), None)
    n = results[0]["n"]
    lines = [f"Model: MLP 500-999-500-3, {n:,} fp32 parameters; W={args.world}, gloo, mean of {args.steps} steps "
             "after 2 warm-up steps; barrier bytes subtracted.", "",
             "| mode | wire bytes/step (all ranks) | per element | cost model | vs DDP | resident param+grad+momentum bytes/rank |",
             "|---|---|---|---|---|---|"]
    for r in results:
        model = cost_model(r["mode"], n, args.world, r["opt_sent"])
        ratio = f"{r['wire'] / base:.3f}" if base else "–"
        lines.append(f"| {r['mode']} | {r['wire']:,.0f} | {r['wire'] / n:.3f} | {model:,.0f} | {ratio} | "
                     f"{r['resident']:,.0f} |")
    lines += ["", *(f"- `{m}`: {MODES[m]}" for m in args.modes)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
