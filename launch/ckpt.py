"""Checkpoints of the demo, through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``ckpt_<step>/`` that every rank writes together: the model (the
same on every rank, written once), the optimizer — for the sharded optimizers each rank's own
shard of the state (:meth:`~leo_dist.ShardedLion.sharded_state_dict`: nothing is gathered), for
the others their replicated ``state_dict()`` — and a JSON string of run metadata. It is written
to ``ckpt_<step>.tmp/`` and renamed by rank 0 once DCP has committed it, so a crash mid-write
leaves the previous checkpoint intact. Resuming reads, on each rank, only what that rank needs,
at any world size.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed.checkpoint as dcp

from launch.ranks import Dist

CHECKPOINT_RE = re.compile(r"^ckpt_(\d{8})$")
CHECKPOINT_FORMAT = "leo_dist.launch.train/2"  # /2: DCP directories (/1 was one torch.save file)


def _is_sharded(opt) -> bool:
    return hasattr(opt, "sharded_state_dict")


def _optim_entry(opt):
    # A tuple is a leaf for DCP: the replicated state of a plain optimizer is pickled as one object.
    return opt.sharded_state_dict() if _is_sharded(opt) else (opt.state_dict(),)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(directory, name, ".metadata")):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def save_checkpoint(args, d: Dist, core: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> str:
    """Collective: every rank calls it; returns the checkpoint directory."""
    path = os.path.join(args.checkpoint_dir, f"ckpt_{step:08d}")
    tmp = f"{path}.tmp"
    if d.is_main:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    d.broadcast_object(None)  # the tmp directory is clean before anyone writes into it
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "world_size": d.world,
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    dcp.save({"model": core.state_dict(), "optim": _optim_entry(opt), "meta": json.dumps(meta)}, checkpoint_id=tmp)
    if d.is_main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        if args.keep_checkpoints:
            for _, old in list_checkpoints(args.checkpoint_dir)[:-args.keep_checkpoints]:
                shutil.rmtree(old)
    d.broadcast_object(None)  # nobody reads the directory before it is complete
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
            if not os.path.isfile(os.path.join(path, ".metadata")):
                path = FileNotFoundError(f"--resume {args.resume!r}: not a checkpoint directory written by "
                                         "launch/train.py (no .metadata inside)")
    path = d.broadcast_object(path)
    if isinstance(path, Exception):
        raise SystemExit(f"error: {path}")
    return path


def load_checkpoint(path: str, args, d: Dist, core: torch.nn.Module, opt: torch.optim.Optimizer, log) -> int:
    """Collective: every rank loads ``path`` (a directory on a filesystem every rank can read)."""
    target = {"model": core.state_dict(), "optim": _optim_entry(opt), "meta": ""}
    if not os.path.isdir(path):
        raise SystemExit(f"error: rank {d.rank} cannot read {path}; on several machines the checkpoint "
                         "directory must be on a filesystem every node can read")
    try:
        meta = {}
        probe = {"meta": ""}
        dcp.load(probe, checkpoint_id=path)
        meta = json.loads(probe["meta"])
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        pass
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint written by launch/train.py")
    saved = meta["args"]
    for key in ("preset", "optimizer"):
        if saved.get(key) != getattr(args, key):
            raise SystemExit(f"error: {path} was trained with --{key} {saved.get(key)}, not {getattr(args, key)}")
    if d.is_main:
        changed = [k for k in ("seed", "batch_size", "lr", "weight_decay", "warmup_steps", "schedule", "steps",
                               "grad_comm", "update_comm", "max_chars")
                   if saved.get(k) != getattr(args, k)]
        if meta["world_size"] != d.world:
            changed.append(f"world size {meta['world_size']} -> {d.world}")
        if changed:
            log(f"note: resuming with changed settings ({', '.join(changed)}): the run will not match "
                "an uninterrupted one exactly")
    dcp.load(target, checkpoint_id=path)
    core.load_state_dict(target["model"])
    if _is_sharded(opt):
        opt.load_sharded_state_dict(target["optim"])
    else:
        opt.load_state_dict(target["optim"][0])
    return int(meta["step"])
