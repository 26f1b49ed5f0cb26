"""Rank 0's output: console lines (through tqdm when a bar is shown), the JSON-lines metrics file,
and the run's header and summary."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
from typing import TYPE_CHECKING, Any

import torch

from launch.ranks import Dist
from launch.traffic import fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from launch.loop import Run, Stats


class Reporter:
    """Rank 0's console output (through tqdm when a bar is shown) and the optional JSON-lines file."""

    def __init__(self, args, d: Dist):
        self.enabled = d.is_main
        self.bar = None
        self.metrics = _open_metrics(args.metrics_file) if self.enabled and args.metrics_file else None

    def start_bar(self, args, start_step: int) -> None:
        if not self.enabled or args.no_progress or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.log("note: install tqdm for a progress bar (pip install tqdm)")
            return
        self.bar = tqdm(total=args.stop_at_step or args.steps, initial=start_step, unit="step",
                        dynamic_ncols=True, leave=False)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def record(self, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(fields) + "\n")
            self.metrics.flush()

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def _open_metrics(path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return open(path, "a", encoding="utf-8")



def params_sha256(model) -> str:
    """SHA-256 of the model's state_dict bytes, in key order: equal only for bitwise-equal models."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log_header(rep: Reporter, run: Run) -> None:
    """What runs: world, model, optimizer and mode, and where the bytes it reports come from."""
    args, d = run.args, run.d
    details = [run.mode]
    if run.sharded or args.grad_comm == "powersgd":
        details.append(f"grad_comm {args.grad_comm}")
    if args.optimizer == "sharded_leo":
        details.append(f"update_comm {args.update_comm}")
    rep.log(f"leo_dist demo | world {d.world} ({d.backend}, {d.device.type}) | preset {args.preset}: "
            f"{run.n_params / 1e6:.2f}M params, block {run.cfg.block_size} | optimizer {args.optimizer} "
            f"({', '.join(details)}) | {args.batch_size} seq/rank, {run.tokens_per_step} tokens/step | lr {args.lr:g}")
    if run.sharded:
        bytes_source = "optimizer bytes are what opt.comm_stats() reports"
    elif args.ddp:
        bytes_source = ("this run's bytes are DDP's all-reduce by the same cost model"
                        + (" at 2 bytes/element (bf16 hook)" if run.grad_bytes == 2 else "")
                        + (" of PowerSGD's factors and uncompressed tensors after its plain warm-up steps"
                           if args.grad_comm == "powersgd" else ""))
    else:
        bytes_source = "this run has no gradient collectives"
    rep.log(f"bytes: DDP fp32 reference = ring all-reduce cost model 2*(W-1)/W*4*N = {fmt_bytes(run.ddp_ref)} "
            f"sent per rank per step (W={d.world}, N={run.n_params}); "
            + bytes_source)
    if args.optimizer == "sharded_leo" and args.update_comm == "exact" and d.world > 1:
        rep.log("note: with --update-comm exact, Leo's 2-D updates travel in fp32 (bit-exact Leo, docs/design.md), so "
                "matrices cost as much as in ZeRO; only the sign parameters travel as 1 bit. --update-comm 1bit "
                "sends them as signs + scales; sharded_lion sends 1 bit for every parameter")


def log_summary(rep: Reporter, run: Run, stats: Stats, end_step: int) -> None:
    """The closing table (console) and the ``summary`` record (metrics file)."""
    args, d, ddp_ref = run.args, run.d, run.ddp_ref
    # The first step includes DDP's bucket rebuild and lazy state allocation; leave it out.
    timed = stats.step_times[1:] or stats.step_times
    step_s = statistics.mean(timed)
    sent_mean = statistics.mean(stats.sent) if stats.sent else None
    recv_mean = statistics.mean(stats.received) if stats.received else None
    ratio = sent_mean / ddp_ref if sent_mean is not None and ddp_ref > 0 else None
    digest = params_sha256(run.core)
    source = "opt.comm_stats()" if run.sharded else ("DDP cost model" if args.ddp else "no collectives")
    rows = [
        ("optimizer", f"{args.optimizer} ({run.mode}), world {d.world}, {d.backend}"),
        ("final train loss", f"{stats.last_loss:.4f} (step {end_step}, mean over ranks)"),
        ("final val loss", f"{stats.val_loss:.4f}"),
        ("step time", f"{step_s * 1e3:.1f} ms (mean of {len(timed)} steps)"),
        ("throughput", f"{run.tokens_per_step / step_s:,.0f} tokens/s"),
        ("sent bytes/step", f"{fmt_bytes(sent_mean)} per rank ({source})"),
        ("received bytes/step", f"{fmt_bytes(recv_mean)} per rank ({source})"),
        *[(f"  {kind}", f"{fmt_bytes(c['sent'])} sent in {c['calls']} call(s) (last step)")
          for kind, c in stats.last_comm.items()],
        ("DDP fp32 bytes/step", f"{fmt_bytes(ddp_ref)} per rank (cost model 2*(W-1)/W*4*N)"),
        ("params sha256", digest + ("" if stats.replicas_equal is None else
                                    f" (replicas {'equal' if stats.replicas_equal else 'DIFFER'})")),
        ("ratio vs DDP fp32", f"{ratio:.3f} (mean), {stats.sent[-1] / ddp_ref:.3f} (last step)"
         if ratio is not None else "n/a (world of 1: DDP sends nothing)"),
    ]
    width = max(len(k) for k, _ in rows)
    rep.log("summary")
    for k, v in rows:
        rep.log(f"  {k:<{width}}  {v}")
    rep.record(kind="summary", optimizer=args.optimizer, world_size=d.world, steps=end_step,
               final_loss=stats.last_loss, val_loss=stats.val_loss, step_time_s=step_s, sent_bytes_per_step=sent_mean,
               received_bytes_per_step=recv_mean, ddp_fp32_bytes_per_step=ddp_ref, ratio_vs_ddp_fp32=ratio,
               params_sha256=digest, replicas_equal=stats.replicas_equal)
