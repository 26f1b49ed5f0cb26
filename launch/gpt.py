"""A small GPT-style character-level language model and its data: the Python standard library's
own source files, which ship with every Python, so the demo and benchmarks download nothing.

Used by ``launch/train.py`` and ``benchmarks/slow_link``; deterministic given a seed.
"""
from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GPTConfig", "GPT", "load_corpus", "get_batch", "PRESETS"]

# Modules read in this order; fixed so that every machine builds the same corpus.
_CORPUS_MODULES = (
    "argparse", "collections/__init__", "dataclasses", "difflib", "functools", "inspect",
    "json/decoder", "json/encoder", "logging/__init__", "pathlib", "pprint", "shutil",
    "string", "textwrap", "threading", "typing", "unittest/case", "zipfile",
)


@dataclass
class GPTConfig:
    vocab_size: int = 128
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


# ~0.4M, ~3M, ~10M and ~50M parameters (with vocab 128).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=64),
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=128),
    "10m": dict(n_layer=6, n_head=8, n_embd=384, block_size=128),
    "50m": dict(n_layer=10, n_head=10, n_embd=640, block_size=128),
}


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer. ``forward(idx[B, T] int64, targets[B, T] | None)`` returns
    ``(logits[B, T, vocab], loss | None)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("out.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def load_corpus(max_chars: int | None = 2_000_000, val_fraction: float = 0.1) -> tuple[Tensor, Tensor, int]:
    """Bytes of standard-library sources as token ids (ASCII; other bytes map to 0).

    Returns ``(train_ids, val_ids, vocab_size=128)``: 1-D int64 tensors, the last
    ``val_fraction`` of the text held out. Raises ``FileNotFoundError`` if the stdlib sources
    are missing (some minimal Python builds strip them).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for mod in _CORPUS_MODULES:
        path = os.path.join(root, mod + ".py")
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if max_chars is not None and total >= max_chars:
            break
    raw = b"".join(chunks)[:max_chars]
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    ids[ids >= 128] = 0
    n_val = max(int(len(ids) * val_fraction), 1)
    return ids[:-n_val], ids[-n_val:], 128


def get_batch(ids: Tensor, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of ``ids``: inputs and next-token targets, each ``[batch_size, block_size]``."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y
