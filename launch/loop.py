"""The demo's training run: build the model and optimizer (wrapping in DDP if asked), resume, then
step, log, evaluate and checkpoint.

Determinism: the global torch RNG is reseeded from ``(seed, rank, step)`` before every step and the
batches are functions of the same triple (launch/data.py), so no RNG state is checkpointed.
"""
from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from launch.ckpt import load_checkpoint, resolve_resume, save_checkpoint
from launch.data import evaluate, seed_of, train_batch
from launch.faults import FaultInjector, restart_count
from launch.gpt import GPT, PRESETS, GPTConfig, load_corpus
from launch.optimizers import SHARDED, build_optimizer, lr_factor
from launch.ranks import Dist
from launch.report import Reporter, log_header, log_summary
from launch.traffic import (POWERSGD_MIN_COMPRESSION_RATE, POWERSGD_RANK, POWERSGD_START_ITER, comm_delta,
                            comm_totals, ddp_reference_bytes, fmt_bytes, powersgd_reference_bytes)


@dataclass
class Run:
    """What one run trains, and the constants its byte accounting needs."""
    args: argparse.Namespace
    d: Dist
    cfg: GPTConfig
    core: torch.nn.Module  # the bare model: parameters, state_dict, evaluation
    model: torch.nn.Module  # what the steps call: ``core``, or ``core`` inside DDP
    opt: torch.optim.Optimizer
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    n_params: int
    sharded: bool
    mode: str

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.cfg.block_size * self.d.world

    @property
    def grad_bytes(self) -> int:
        """Bytes per element of DDP's all-reduce: 2 with torch's bf16 compress hook, else 4."""
        return 2 if self.args.grad_comm == "bf16" and not self.sharded else 4

    @functools.cached_property
    def powersgd_bytes(self) -> float:
        return powersgd_reference_bytes([p.shape for p in self.core.parameters() if p.requires_grad], self.d.world)

    def ddp_step_bytes(self, step: int) -> float:
        """Bytes one rank sends in DDP's all-reduce(s) at (1-based) ``step`` (ring cost model)."""
        if self.args.grad_comm == "powersgd" and step > POWERSGD_START_ITER:
            return self.powersgd_bytes
        return ddp_reference_bytes(self.n_params, self.d.world, self.grad_bytes)

    @property
    def ddp_ref(self) -> float:
        return ddp_reference_bytes(self.n_params, self.d.world)


@dataclass
class Stats:
    """Per-step measurements, for the closing summary."""
    step_times: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    last_comm: dict[str, dict[str, int]] = field(default_factory=dict)
    last_loss: float | None = None
    val_loss: float | None = None
    replicas_equal: bool | None = None  # sharded optimizers: opt.verify_replicas() after the last step


def build(args, d: Dist) -> Run:
    sharded = args.optimizer in SHARDED
    if d.world > 1 and not sharded and not args.ddp:
        raise SystemExit(f"error: --optimizer {args.optimizer} does not average gradients across the "
                         f"{d.world} ranks by itself; add --ddp (or use sharded_leo/sharded_lion)")
    if args.grad_comm == "bf16" and not sharded and d.backend != "nccl":
        raise SystemExit("error: torch's bf16_compress_hook refuses gloo; use --grad-comm fp32 with "
                         f"--optimizer {args.optimizer}, or a sharded optimizer, whose bf16 path runs on gloo")

    train_ids, val_ids, vocab = load_corpus(max_chars=args.max_chars)
    cfg = GPTConfig(vocab_size=vocab, **PRESETS[args.preset])
    torch.manual_seed(args.seed)  # identical initial replicas on every rank
    core = GPT(cfg).to(d.device)
    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)

    try:
        opt = build_optimizer(args, core)  # sharded ones broadcast rank 0's parameters, as DDP does
    except (NotImplementedError, TypeError) as exc:  # a mode or keyword this leo_dist lacks
        raise SystemExit(f"error: {exc}") from None
    model: torch.nn.Module = core
    if args.ddp:
        # PowerSGD's hook launches its Q all-reduce from the P all-reduce's callback: with several
        # DDP buckets those race the next bucket's collectives and gloo pairs mismatched ones, so
        # PowerSGD gets one bucket (the slow-link suite does the same).
        ddp_kw = dict(bucket_cap_mb=1024) if args.grad_comm == "powersgd" else {}
        model = DDP(core, device_ids=[d.device.index] if d.device.type == "cuda" else None, **ddp_kw)
        if sharded:
            from leo_dist import hooks as leo_hooks
            leo_hooks.attach(model, opt)
        elif args.grad_comm == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif args.grad_comm == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=POWERSGD_RANK,
                                       start_powerSGD_iter=POWERSGD_START_ITER,
                                       min_compression_rate=POWERSGD_MIN_COMPRESSION_RATE, random_seed=0)
            model.register_comm_hook(state, psgd.powerSGD_hook)
    mode = ("DDP + leo_dist hook" if sharded else "DDP") if args.ddp else ("standalone" if sharded else "local")
    return Run(args, d, cfg, core, model, opt, train_ids, val_ids, n_params, sharded, mode)


def train(args, d: Dist) -> int:
    run = build(args, d)
    base_lrs = [group["lr"] for group in run.opt.param_groups]

    start_step = 0
    resume_path = resolve_resume(args, d)
    rep = Reporter(args, d)
    if resume_path is not None:
        start_step = load_checkpoint(resume_path, args, d, run.core, run.opt, rep.log)
    elif args.resume:
        rep.log(f"no checkpoint in {args.checkpoint_dir}; starting from step 0")
    rep.start_bar(args, start_step)
    log_header(rep, run)
    if start_step:
        rep.log(f"resumed from {resume_path} at step {start_step}"
                + (f" (torchrun restart {restart_count()})" if restart_count() else ""))
        rep.record(kind="resume", step=start_step, path=resume_path, restart=restart_count())
    end_step = args.stop_at_step or args.steps
    if start_step >= end_step:
        rep.log(f"checkpoint is already at step {start_step} >= {end_step}; nothing to do")
        rep.close()
        return 0

    stats = run_steps(run, rep, base_lrs, start_step, end_step)
    if run.sharded:
        stats.replicas_equal = run.opt.verify_replicas()
    log_summary(rep, run, stats, end_step)
    rep.close()
    return 0


def run_steps(run: Run, rep: Reporter, base_lrs: list[float], start_step: int, end_step: int) -> Stats:
    args, d, opt = run.args, run.d, run.opt
    stats = Stats()
    fault = FaultInjector(d.rank)  # test-only (launch/faults.py): nothing unless the env var names this rank
    # tokens/s covers training only: evaluation and checkpoint time is subtracted from the window.
    window_t0, window_steps, window_paused = time.perf_counter(), 0, 0.0
    run.model.train()
    for step in range(start_step + 1, end_step + 1):
        torch.manual_seed(seed_of("torch", args.seed, d.rank, step))  # e.g. dropout: replayable on resume
        x, y = train_batch(run.train_ids, args, run.cfg, d.rank, step, d.device)
        factor = lr_factor(args, step)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor

        comm_before = comm_totals(opt) if run.sharded else None
        t0 = time.perf_counter()
        _, loss = run.model(x, y)
        loss.backward()
        if args.clip_grad_norm > 0:
            if run.sharded:
                opt.clip_grad_norm_(args.clip_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(run.core.parameters(), args.clip_grad_norm)
        fault.at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        stats.step_times.append(time.perf_counter() - t0)
        window_steps += 1

        if run.sharded:
            stats.last_comm = comm_delta(comm_totals(opt), comm_before)
            sent = float(sum(c["sent"] for c in stats.last_comm.values()))
            recv = float(sum(c["received"] for c in stats.last_comm.values()))
        else:
            sent = recv = run.ddp_step_bytes(step) if args.ddp else 0.0
        stats.sent.append(sent)
        stats.received.append(recv)

        if step % args.log_interval == 0 or step == end_step:
            (stats.last_loss,) = d.mean([loss.item()])
            elapsed = time.perf_counter() - window_t0 - window_paused
            tok_s = window_steps * run.tokens_per_step / elapsed
            ratio = f"{sent / run.ddp_ref:.3f}x DDP fp32" if run.ddp_ref > 0 else "W=1: DDP sends nothing"
            rep.log(f"step {step:>6}/{args.steps} | loss {stats.last_loss:.6f} | lr {args.lr * factor:.2e} | "
                    f"{tok_s:,.0f} tok/s | sent {fmt_bytes(sent)}/step/rank ({ratio})")
            rep.record(kind="train", step=step, loss=stats.last_loss, lr=args.lr * factor, tokens_per_s=tok_s,
                       sent_bytes=sent, received_bytes=recv, ddp_fp32_bytes=run.ddp_ref)
            window_t0, window_steps, window_paused = time.perf_counter(), 0, 0.0
        rep.advance(stats.last_loss)

        t_pause = time.perf_counter()
        if (args.eval_interval and step % args.eval_interval == 0) or step == end_step:
            stats.val_loss = evaluate(run.core, run.val_ids, args, run.cfg, d)
            rep.log(f"eval  {step:>6}/{args.steps} | val loss {stats.val_loss:.6f}")
            rep.record(kind="eval", step=step, val_loss=stats.val_loss)

        if args.checkpoint_dir and ((args.checkpoint_interval and step % args.checkpoint_interval == 0)
                                    or step == end_step):
            path = save_checkpoint(args, d, run.core, opt, step)
            rep.log(f"checkpoint step {step} -> {path}")
        window_paused += time.perf_counter() - t_pause
    return stats
