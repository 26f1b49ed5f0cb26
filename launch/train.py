#!/usr/bin/env python
"""Train a small GPT-style character LM data-parallel with leo_dist, and show what it saves.

Runs under torchrun (one process per rank; RANK/WORLD_SIZE/LOCAL_RANK come from the
environment) or as plain ``python launch/train.py`` (a world of one). See launch/README.md.

    torchrun --standalone --nproc-per-node 2 launch/train.py --preset tiny --steps 200

Determinism and resume: the batch of step ``s`` on rank ``r`` is drawn from a generator seeded by
``(seed, r, s)``, and the global torch RNG is reseeded from the same triple before every step, so
no RNG state needs to be checkpointed: a run resumed at step ``s`` sees exactly the data and
randomness an uninterrupted run sees at ``s``. Checkpoints are single files written by rank 0
with ``torch.save`` (tmp file + ``os.replace``) and read on every rank with
``torch.load(weights_only=True)``; multi-node resume therefore needs the checkpoint directory on a
filesystem every node can read.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):
    # Running as a script puts launch/ on sys.path, not the repository root that holds
    # both `launch` and (for an uninstalled checkout) `leo_dist`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import leo_dist
from launch.gpt import GPT, PRESETS, GPTConfig, get_batch, load_corpus

try:  # the sharded optimizers are the point of the demo, but keep the baselines usable without them
    from leo_dist import ShardedLeo, ShardedLion
except ImportError as _exc:  # pragma: no cover - depends on the installed leo_dist
    ShardedLeo = ShardedLion = None
    _SHARDED_IMPORT_ERROR: ImportError | None = _exc
else:
    _SHARDED_IMPORT_ERROR = None

OPTIMIZERS = ("sharded_leo", "sharded_lion", "leo", "lion", "adamw")
SHARDED = ("sharded_leo", "sharded_lion")
# Defaults per optimizer family. Sign optimizers take every coordinate a full step, so they want a
# smaller lr than AdamW; Lion's unit-size sign step is 1/align_const times Leo's.
DEFAULT_LR = {"leo": 1e-3, "lion": 3e-4, "adamw": 2e-3}
DEFAULT_WD = {"leo": 0.01, "lion": 0.1, "adamw": 0.1}
DEFAULT_BETAS = {"leo": (0.9, 0.99), "lion": (0.9, 0.99), "adamw": (0.9, 0.95)}
CHECKPOINT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
CHECKPOINT_FORMAT = "leo_dist.launch.train/1"


def _family(optimizer: str) -> str:
    return optimizer.removeprefix("sharded_")


# --------------------------------------------------------------------------------------- CLI


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or value > hi:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be in {bound}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a small character-level GPT data-parallel with leo_dist's sharded Leo/Lion "
                    "(or a baseline optimizer) and report the bytes each rank sends per step next to "
                    "DDP's fp32 all-reduce.",
        epilog="Examples:\n"
               "  python launch/train.py --preset tiny --steps 50\n"
               "  torchrun --standalone --nproc-per-node 2 launch/train.py --preset tiny --steps 200\n"
               "  torchrun --standalone --nproc-per-node 2 launch/train.py --optimizer adamw --ddp\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model size from launch/gpt.py: tiny ~0.4M, small ~3M, 10m ~11M parameters (default: tiny)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=16,
                   help="sequences per rank per step; the global batch is this times the world size (default: 16)")
    g.add_argument("--max-chars", type=_int_at_least(10_000), default=2_000_000,
                   help="characters of standard-library source to read as the corpus (default: 2000000)")
    g.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seeds the model init and every rank's per-step data stream (default: 0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sharded_leo",
                   help="sharded_* use leo_dist's sharded optimizers (reduce-scatter + 1-bit all-gather); "
                        "leo/lion/adamw are single-process optimizers that need --ddp when the world has "
                        "more than one rank (default: sharded_leo)")
    g.add_argument("--steps", type=_int_at_least(1), default=200,
                   help="total optimizer steps; also the length of the lr schedule (default: 200)")
    g.add_argument("--stop-at-step", type=_int_at_least(1), default=None, metavar="STEP",
                   help="end this run after STEP (evaluating and checkpointing it) while keeping the lr schedule "
                        "of --steps, e.g. for jobs in time-limited slots that --resume later")
    g.add_argument("--lr", type=_float_range(0.0, lo_open=True), default=None,
                   help="peak learning rate (default: leo 1e-3, lion 3e-4, adamw 2e-3)")
    g.add_argument("--weight-decay", type=_float_range(0.0), default=None,
                   help="decoupled weight decay on matrices; embeddings, norms and biases get none "
                        "(default: leo 0.01, lion 0.1, adamw 0.1)")
    g.add_argument("--warmup-steps", type=_int_at_least(0), default=None,
                   help="linear lr warm-up steps (default: min(100, steps // 10))")
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="lr after warm-up: cosine decay to 10%% of the peak, or constant (default: cosine)")
    g.add_argument("--clip-grad-norm", type=_float_range(0.0), default=0.0,
                   help="clip the global norm of the averaged gradients to this value; 0 disables (default: 0)")

    g = p.add_argument_group("communication")
    g.add_argument("--grad-comm", choices=("fp32", "bf16", "1bit"), default="fp32",
                   help="wire dtype of the gradient reduce-scatter of the sharded optimizers. With a "
                        "non-sharded optimizer and --ddp, bf16 registers torch's bf16 compress hook "
                        "(NCCL only); 1bit is sharded-only (default: fp32)")
    g.add_argument("--grad-comm-warmup", type=_int_at_least(0), default=None, metavar="STEPS",
                   help="with --grad-comm 1bit: steps that still send uncompressed gradients first "
                        "(default: the optimizer's)")
    g.add_argument("--update-comm", choices=("exact", "1bit"), default="exact",
                   help="sharded_leo only: how Leo's 2-D updates travel: exact (parameter dtype) or 1bit "
                        "(signs + scales with error feedback) (default: exact)")
    g.add_argument("--bucket-mb", type=_float_range(0.0, lo_open=True), default=25.0,
                   help="bucket size of the sharded optimizers' collectives in MiB (default: 25)")
    g.add_argument("--ddp", action="store_true",
                   help="wrap the model in DistributedDataParallel; with a sharded optimizer, leo_dist.hooks "
                        "replaces DDP's all-reduce by the optimizer's reduce-scatter")
    g.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda:LOCAL_RANK when CUDA is available, else cpu (default: auto)")
    g.add_argument("--dist-timeout", type=_int_at_least(1), default=600,
                   help="seconds before a stuck collective raises instead of hanging (default: 600)")

    g = p.add_argument_group("evaluation, logging and checkpoints")
    g.add_argument("--log-interval", type=_int_at_least(1), default=20,
                   help="print the training loss every N steps (default: 20)")
    g.add_argument("--eval-interval", type=_int_at_least(0), default=50,
                   help="compute the validation loss every N steps and at the end; 0: only at the end (default: 50)")
    g.add_argument("--eval-batches", type=_int_at_least(1), default=16,
                   help="validation batches per evaluation, split across ranks (default: 16)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="directory for checkpoints ckpt_<step>.pt; none are written without it")
    g.add_argument("--checkpoint-interval", type=_int_at_least(0), default=0,
                   help="save every N steps (and always at the end when --checkpoint-dir is set); 0: only at the end")
    g.add_argument("--keep-checkpoints", type=_int_at_least(0), default=3,
                   help="keep only the newest N checkpoints; 0 keeps all (default: 3)")
    g.add_argument("--resume", default=None, metavar="PATH|latest",
                   help="continue from a checkpoint file, or 'latest' for the newest in --checkpoint-dir "
                        "(starts from scratch if there is none)")
    g.add_argument("--metrics-file", default=None,
                   help="rank 0 appends JSON lines (train, eval and summary records) to this file")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    fam = _family(args.optimizer)
    if args.lr is None:
        args.lr = DEFAULT_LR[fam]
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WD[fam]
    if args.warmup_steps is None:
        args.warmup_steps = min(100, args.steps // 10)
    if args.warmup_steps >= args.steps and args.steps > 1:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be smaller than --steps ({args.steps})")
    sharded = args.optimizer in SHARDED
    if args.update_comm != "exact" and args.optimizer != "sharded_leo":
        parser.error("--update-comm only applies to --optimizer sharded_leo")
    if args.grad_comm_warmup is not None and args.grad_comm != "1bit":
        parser.error("--grad-comm-warmup only applies with --grad-comm 1bit")
    if not sharded and args.grad_comm == "1bit":
        parser.error("--grad-comm 1bit needs a sharded optimizer (sharded_leo or sharded_lion)")
    if not sharded and args.grad_comm == "bf16" and not args.ddp:
        parser.error("--grad-comm bf16 with a non-sharded optimizer means DDP's bf16 compress hook: add --ddp")
    if args.stop_at_step is not None and args.stop_at_step > args.steps:
        parser.error(f"--stop-at-step ({args.stop_at_step}) must not exceed --steps ({args.steps})")
    if args.resume == "latest" and not args.checkpoint_dir:
        parser.error("--resume latest needs --checkpoint-dir")
    if args.checkpoint_interval and not args.checkpoint_dir:
        parser.error("--checkpoint-interval needs --checkpoint-dir")
    if sharded and ShardedLeo is None:
        parser.error(f"--optimizer {args.optimizer} needs leo_dist.ShardedLeo/ShardedLion, which this leo_dist "
                     f"does not provide ({_SHARDED_IMPORT_ERROR}); use leo/lion/adamw with --ddp")
    return args


# ------------------------------------------------------------------------------ distributed


class Dist:
    """Rank, world and device of this process, and the helpers that must agree across ranks."""

    def __init__(self, args: argparse.Namespace):
        env_world = os.environ.get("WORLD_SIZE")
        self.launched = env_world is not None and "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0)) if self.launched else 0
        self.world = int(env_world) if self.launched else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.launched else 0

        want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
        if want_cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise SystemExit(f"error: LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} "
                                 "CUDA devices are visible; lower --nproc-per-node")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = args.backend or ("nccl" if want_cuda else "gloo")
        if self.backend == "nccl" and not want_cuda:
            raise SystemExit("error: --backend nccl needs CUDA devices; use --backend gloo on CPU")

        timeout = datetime.timedelta(seconds=args.dist_timeout)
        kw: dict[str, Any] = dict(backend=self.backend, timeout=timeout)
        if self.backend == "nccl":
            kw["device_id"] = self.device
        if self.launched:
            dist.init_process_group(**kw)  # env:// rendezvous set up by torchrun
        elif args.ddp:
            # DDP needs a process group even for one rank; an in-memory store avoids picking a port.
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)
        self.initialized = dist.is_initialized()
        if self.initialized and (dist.get_rank() != self.rank or dist.get_world_size() != self.world):
            raise SystemExit("error: RANK/WORLD_SIZE in the environment disagree with the process group")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        """Mean over ranks of a few floats (fp64 so the sum is exact enough to compare runs)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.initialized and self.world > 1:
            dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.initialized and self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        if not (self.initialized and self.world > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self, clean: bool) -> None:
        if self.initialized:
            if clean and self.world > 1:
                # A rank that tears gloo down while a peer is still in its last collective can
                # abort that peer ("terminate called without an active exception"); leave together.
                dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------- data


def _seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple; hashed so that neighbouring tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_batch(ids, args, cfg: GPTConfig, rank: int, step: int, device):
    g = torch.Generator().manual_seed(_seed_of("train", args.seed, rank, step))
    x, y = get_batch(ids, args.batch_size, cfg.block_size, g)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, val_ids, args, cfg: GPTConfig, d: Dist) -> float:
    """Mean loss over a fixed set of validation batches, the same set at every world size."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(d.rank, args.eval_batches, d.world):
        g = torch.Generator().manual_seed(_seed_of("val", args.seed, i))
        x, y = get_batch(val_ids, args.batch_size, cfg.block_size, g)
        _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.item()
        count += 1
    model.train(was_training)
    total, count = d.sum([total, float(count)])
    return total / count


# -------------------------------------------------------------------------------- optimizer


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Leo's helper already splits "matrices" from "embeddings, norms, biases"; AdamW and Lion
    # want the same split for weight decay, without Leo's orthogonalize key.
    groups = leo_dist.leo_param_groups(model, weight_decay=weight_decay)
    return [{k: v for k, v in grp.items() if k != "orthogonalize"} for grp in groups]


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    fam = _family(args.optimizer)
    betas = DEFAULT_BETAS[fam]
    if fam == "leo":
        groups = leo_dist.leo_param_groups(model, weight_decay=args.weight_decay)
    else:
        groups = _decay_groups(model, args.weight_decay)
    comm_kw: dict[str, Any] = dict(process_group=None, grad_comm=args.grad_comm, bucket_mb=args.bucket_mb)
    if args.grad_comm_warmup is not None:
        comm_kw["grad_comm_warmup"] = args.grad_comm_warmup
    if args.optimizer == "sharded_leo":
        return ShardedLeo(groups, update_comm=args.update_comm, lr=args.lr, betas=betas, **comm_kw)
    if args.optimizer == "sharded_lion":
        return ShardedLion(groups, lr=args.lr, betas=betas, **comm_kw)
    if fam == "leo":
        return leo_dist.Leo(groups, lr=args.lr, betas=betas)
    if fam == "lion":
        return leo_dist.Lion(groups, lr=args.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas)


def lr_factor(args, step: int) -> float:
    """Multiplier of the peak lr at (1-based) ``step``: a pure function of the step, so resume needs no state."""
    if args.warmup_steps and step <= args.warmup_steps:
        return step / args.warmup_steps
    if args.schedule == "constant" or args.steps <= args.warmup_steps:
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def comm_totals(opt) -> dict[str, dict[str, int]]:
    """Running per-kind byte totals of a sharded optimizer: ``{kind: {"sent", "received", "calls"}}``.

    Steps are measured as differences of these totals taken around forward/backward/step, not
    from ``comm_stats()["last_step"]``: that one also books the construction-time parameter
    broadcast and a checkpoint's momentum all-gather onto the following step.
    """
    # Layout: {"last_step": {kind: {...}, "sum": {...}}, "total": {kind: {calls, bytes_in, bytes_out,
    # sent, received}, "sum": {...}}, "steps": n}
    total = opt.comm_stats().get("total", {})
    return {k: {f: int(v.get(f, 0)) for f in ("sent", "received", "calls")}
            for k, v in total.items() if k != "sum" and isinstance(v, dict)}


def comm_delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    zero = {"sent": 0, "received": 0, "calls": 0}
    return {k: {f: v[f] - before.get(k, zero)[f] for f in zero} for k, v in after.items()
            if v["calls"] != before.get(k, zero)["calls"]}


def ddp_reference_bytes(n_params: int, world: int, bytes_per_elem: int = 4) -> float:
    """Bytes one rank sends per step in a ring all-reduce of ``n_params`` elements (cost model)."""
    return 2.0 * (world - 1) / world * bytes_per_elem * n_params


# ------------------------------------------------------------------------------- checkpoints


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def save_checkpoint(args, d: Dist, core: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> str | None:
    # Collective for the sharded optimizers (the full momentum is gathered), so every rank calls it.
    opt_state = opt.state_dict()
    if not d.is_main:
        return None
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    path = os.path.join(args.checkpoint_dir, f"ckpt_{step:08d}.pt")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "world_size": d.world,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "model": core.state_dict(),
        "optimizer": opt_state,
    }
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if args.keep_checkpoints:
        for _, old in list_checkpoints(args.checkpoint_dir)[:-args.keep_checkpoints]:
            os.remove(old)
    return path


def resolve_resume(args, d: Dist) -> str | None:
    """The checkpoint path to load, decided on rank 0 so that every rank loads the same file."""
    path = None
    if d.is_main and args.resume:
        if args.resume == "latest":
            found = list_checkpoints(args.checkpoint_dir)
            path = found[-1][1] if found else None
        else:
            path = args.resume
            if not os.path.isfile(path):
                path = FileNotFoundError(f"--resume {args.resume!r}: no such file")
    path = d.broadcast_object(path)
    if isinstance(path, Exception):
        raise SystemExit(f"error: {path}")
    return path


def load_checkpoint(path: str, args, d: Dist, core: torch.nn.Module, opt: torch.optim.Optimizer, log) -> int:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: rank {d.rank} cannot read {path}; on several machines the checkpoint "
                         "directory must be on a filesystem every node can read") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint written by launch/train.py")
    saved = ckpt["args"]
    for key in ("preset", "optimizer"):
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: {path} was trained with --{key} {saved.get(key)}, not {getattr(args, key)}")
    if d.is_main:
        changed = [k for k in ("seed", "batch_size", "lr", "weight_decay", "warmup_steps", "schedule", "steps",
                               "grad_comm", "update_comm", "max_chars")
                   if saved.get(k) != getattr(args, k)]
        if ckpt["world_size"] != d.world:
            changed.append(f"world size {ckpt['world_size']} -> {d.world}")
        if changed:
            log(f"note: resuming with changed settings ({', '.join(changed)}): the run will not match "
                "an uninterrupted one exactly")
    core.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])


# --------------------------------------------------------------------------------- reporting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


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


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = Dist(args)
    clean = False
    try:
        rc = train(args, d)
        clean = True
        return rc
    finally:
        d.close(clean)


def _open_metrics(path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def train(args, d: Dist) -> int:
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
        model = DDP(core, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        if sharded:
            from leo_dist import hooks as leo_hooks
            leo_hooks.attach(model, opt)
        elif args.grad_comm == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    base_lrs = [group["lr"] for group in opt.param_groups]

    start_step = 0
    resume_path = resolve_resume(args, d)
    rep = Reporter(args, d)
    if resume_path is not None:
        start_step = load_checkpoint(resume_path, args, d, core, opt, rep.log)
    elif args.resume:
        rep.log(f"no checkpoint in {args.checkpoint_dir}; starting from step 0")
    rep.start_bar(args, start_step)

    tokens_per_step = args.batch_size * cfg.block_size * d.world
    grad_bytes = 2 if args.grad_comm == "bf16" and not sharded else 4
    ddp_ref = ddp_reference_bytes(n_params, d.world)
    mode = ("DDP + leo_dist hook" if sharded else "DDP") if args.ddp else ("standalone" if sharded else "local")
    details = [mode]
    if sharded:
        details.append(f"grad_comm {args.grad_comm}")
    if args.optimizer == "sharded_leo":
        details.append(f"update_comm {args.update_comm}")
    rep.log(f"leo_dist demo | world {d.world} ({d.backend}, {d.device.type}) | preset {args.preset}: "
            f"{n_params / 1e6:.2f}M params, block {cfg.block_size} | optimizer {args.optimizer} ({', '.join(details)})"
            f" | {args.batch_size} seq/rank, {tokens_per_step} tokens/step | lr {args.lr:g}")
    if sharded:
        bytes_source = "optimizer bytes are what opt.comm_stats() reports"
    elif args.ddp:
        bytes_source = ("this run's bytes are DDP's all-reduce by the same cost model"
                        + (" at 2 bytes/element (bf16 hook)" if grad_bytes == 2 else ""))
    else:
        bytes_source = "this run has no gradient collectives"
    rep.log(f"bytes: DDP fp32 reference = ring all-reduce cost model 2*(W-1)/W*4*N = {fmt_bytes(ddp_ref)} "
            f"sent per rank per step (W={d.world}, N={n_params}); "
            + bytes_source)
    if args.optimizer == "sharded_leo" and args.update_comm == "exact" and d.world > 1:
        rep.log("note: with --update-comm exact, Leo's 2-D updates travel in fp32 (bit-exact Leo, SPEC §2), so "
                "matrices cost as much as in ZeRO; only the sign parameters travel as 1 bit. --update-comm 1bit "
                "sends them as signs + scales; sharded_lion sends 1 bit for every parameter")
    if start_step:
        rep.log(f"resumed from {resume_path} at step {start_step}")
    end_step = args.stop_at_step or args.steps
    if start_step >= end_step:
        rep.log(f"checkpoint is already at step {start_step} >= {end_step}; nothing to do")
        rep.close()
        return 0

    last_comm: dict[str, dict[str, int]] = {}
    step_times: list[float] = []
    sent_per_step: list[float] = []
    recv_per_step: list[float] = []
    # tokens/s covers training only: evaluation and checkpoint time is subtracted from the window.
    window_t0, window_steps, window_paused = time.perf_counter(), 0, 0.0
    last_loss = val_loss = None
    model.train()
    for step in range(start_step + 1, end_step + 1):
        torch.manual_seed(_seed_of("torch", args.seed, d.rank, step))  # e.g. dropout: replayable on resume
        x, y = train_batch(train_ids, args, cfg, d.rank, step, d.device)
        factor = lr_factor(args, step)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor

        comm_before = comm_totals(opt) if sharded else None
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        if args.clip_grad_norm > 0:
            if sharded:
                opt.clip_grad_norm_(args.clip_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(core.parameters(), args.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        step_times.append(time.perf_counter() - t0)
        window_steps += 1

        if sharded:
            last_comm = comm_delta(comm_totals(opt), comm_before)
            sent = float(sum(c["sent"] for c in last_comm.values()))
            recv = float(sum(c["received"] for c in last_comm.values()))
        else:
            sent = recv = ddp_reference_bytes(n_params, d.world, grad_bytes) if args.ddp else 0.0
        sent_per_step.append(sent)
        recv_per_step.append(recv)

        if step % args.log_interval == 0 or step == end_step:
            (last_loss,) = d.mean([loss.item()])
            elapsed = time.perf_counter() - window_t0 - window_paused
            tok_s = window_steps * tokens_per_step / elapsed
            ratio = f"{sent / ddp_ref:.3f}x DDP fp32" if ddp_ref > 0 else "W=1: DDP sends nothing"
            rep.log(f"step {step:>6}/{args.steps} | loss {last_loss:.6f} | lr {args.lr * factor:.2e} | "
                    f"{tok_s:,.0f} tok/s | sent {fmt_bytes(sent)}/step/rank ({ratio})")
            rep.record(kind="train", step=step, loss=last_loss, lr=args.lr * factor, tokens_per_s=tok_s,
                       sent_bytes=sent, received_bytes=recv, ddp_fp32_bytes=ddp_ref)
            window_t0, window_steps, window_paused = time.perf_counter(), 0, 0.0
        rep.advance(last_loss)

        t_pause = time.perf_counter()
        if (args.eval_interval and step % args.eval_interval == 0) or step == end_step:
            val_loss = evaluate(core, val_ids, args, cfg, d)
            rep.log(f"eval  {step:>6}/{args.steps} | val loss {val_loss:.6f}")
            rep.record(kind="eval", step=step, val_loss=val_loss)

        if args.checkpoint_dir and ((args.checkpoint_interval and step % args.checkpoint_interval == 0)
                                    or step == end_step):
            path = save_checkpoint(args, d, core, opt, step)
            rep.log(f"checkpoint step {step} -> {path}")
        window_paused += time.perf_counter() - t_pause

    # The first step includes DDP's bucket rebuild and lazy state allocation; leave it out.
    timed = step_times[1:] or step_times
    step_s = statistics.mean(timed)
    sent_mean = statistics.mean(sent_per_step) if sent_per_step else None
    recv_mean = statistics.mean(recv_per_step) if recv_per_step else None
    ratio = sent_mean / ddp_ref if sent_mean is not None and ddp_ref > 0 else None
    source = "opt.comm_stats()" if sharded else ("DDP cost model" if args.ddp else "no collectives")
    rows = [
        ("optimizer", f"{args.optimizer} ({mode}), world {d.world}, {d.backend}"),
        ("final train loss", f"{last_loss:.4f} (step {end_step}, mean over ranks)"),
        ("final val loss", f"{val_loss:.4f}"),
        ("step time", f"{step_s * 1e3:.1f} ms (mean of {len(timed)} steps)"),
        ("throughput", f"{tokens_per_step / step_s:,.0f} tokens/s"),
        ("sent bytes/step", f"{fmt_bytes(sent_mean)} per rank ({source})"),
        ("received bytes/step", f"{fmt_bytes(recv_mean)} per rank ({source})"),
        *[(f"  {kind}", f"{fmt_bytes(c['sent'])} sent in {c['calls']} call(s) (last step)")
          for kind, c in last_comm.items()],
        ("DDP fp32 bytes/step", f"{fmt_bytes(ddp_ref)} per rank (cost model 2*(W-1)/W*4*N)"),
        ("ratio vs DDP fp32", f"{ratio:.3f} (mean), {sent_per_step[-1] / ddp_ref:.3f} (last step)"
         if ratio is not None else "n/a (world of 1: DDP sends nothing)"),
    ]
    width = max(len(k) for k, _ in rows)
    rep.log("summary")
    for k, v in rows:
        rep.log(f"  {k:<{width}}  {v}")
    rep.record(kind="summary", optimizer=args.optimizer, world_size=d.world, steps=end_step, final_loss=last_loss,
               val_loss=val_loss, step_time_s=step_s, sent_bytes_per_step=sent_mean,
               received_bytes_per_step=recv_mean, ddp_fp32_bytes_per_step=ddp_ref, ratio_vs_ddp_fp32=ratio)
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
