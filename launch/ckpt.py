"""Checkpoints of the demo: single files ``ckpt_<step>.pt`` written by rank 0 (tmp file +
``os.replace``) and read on every rank with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import re

import torch

from launch.ranks import Dist

CHECKPOINT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
CHECKPOINT_FORMAT = "leo_dist.launch.train/1"  # from when train.py held everything; kept so old files load


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
