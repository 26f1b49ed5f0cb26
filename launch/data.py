"""Batches of the demo: every batch is a pure function of ``(seed, rank, step)`` (validation:
``(seed, index)``), so a resumed run sees exactly the data an uninterrupted one sees."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from launch.gpt import GPTConfig, get_batch
from launch.ranks import Dist


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from a tuple; hashed so that neighbouring tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_batch(ids, args, cfg: GPTConfig, rank: int, step: int, device):
    g = torch.Generator().manual_seed(seed_of("train", args.seed, rank, step))
    x, y = get_batch(ids, args.batch_size, cfg.block_size, g)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, val_ids, args, cfg: GPTConfig, d: Dist) -> float:
    """Mean loss over a fixed set of validation batches, the same set at every world size."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(d.rank, args.eval_batches, d.world):
        g = torch.Generator().manual_seed(seed_of("val", args.seed, i))
        x, y = get_batch(val_ids, args.batch_size, cfg.block_size, g)
        _, loss = model(x.to(d.device), y.to(d.device))
        total += loss.item()
        count += 1
    model.train(was_training)
    total, count = d.sum([total, float(count)])
    return total / count
