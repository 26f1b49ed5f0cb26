"""A nanoGPT-style training script: DDP + AdamW, or the same script with leo_dist.

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --optimizer adamw
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --optimizer leo

Everything a DDP script usually has: gradient accumulation (nanoGPT's
``model.require_backward_grad_sync = last_micro_step``), gradient clipping, bf16 autocast with an
optional GradScaler, a warm-up + cosine lr written into the param groups every step, rank-0
logging, and checkpoints through ``torch.distributed.checkpoint`` (DCP) that every rank writes
together, with resume. ``--optimizer leo|lion`` changes exactly three places, marked ``[leo_dist]``:
the optimizer, ``leo_dist.hooks.attach``, and clipping through ``opt.clip_grad_norm_`` (with the
hook, ``.grad`` holds this rank's local gradient; the averaged one lives in the optimizer's
shards). The checkpoint entry differs too, because the optimizer state is sharded.

The model is the small character-level GPT of ``launch/gpt.py`` on the Python standard library's
sources (nothing to download). Batches are a pure function of ``(seed, rank, step, micro-step)``
and the lr a pure function of the step, so a resumed run continues bitwise like an uninterrupted
one (with fp32 gradients on the wire and no AMP; ``--out`` writes the losses and a hash of the
final parameters to compare).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # launch/ (the model)
import leo_dist  # noqa: E402
from launch.gpt import PRESETS, GPT, GPTConfig, get_batch, load_corpus  # noqa: E402

DEFAULTS = {  # lr, weight decay: Lion/Leo want a smaller lr and a larger decay than AdamW
    "adamw": (1e-3, 0.1), "lion": (3e-4, 0.3), "leo": (3e-3, 0.1),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=sorted(DEFAULTS), default="leo")
    ap.add_argument("--grad-comm", choices=["fp32", "bf16", "1bit"], default="fp32", help="leo_dist only")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--n-layer", type=int), ap.add_argument("--n-embd", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--stop-at", type=int, help="stop after this step (to test resume)")
    ap.add_argument("--batch-size", type=int, default=16, help="per rank and micro-step")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float), ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--scaler", action="store_true", help="with --amp: a GradScaler as for fp16")
    ap.add_argument("--ckpt-dir"), ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", help="a checkpoint directory written by this script")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--max-chars", type=int, default=300_000)
    ap.add_argument("--out", help="rank 0 writes {losses, params_sha256} here as JSON")
    args = ap.parse_args(argv)
    lr, wd = DEFAULTS[args.optimizer]
    args.lr = lr if args.lr is None else args.lr
    args.weight_decay = wd if args.weight_decay is None else args.weight_decay
    return args


def lr_at(args, step):  # warm-up, then cosine to 10%: a function of the step only
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(args, model):
    groups = leo_dist.leo_param_groups(model, weight_decay=args.weight_decay)  # matrices / the rest
    if args.optimizer == "adamw":
        plain = [{k: v for k, v in g.items() if k != "orthogonalize"} for g in groups]
        return torch.optim.AdamW(plain, lr=args.lr, betas=(0.9, 0.95))
    # [leo_dist] the optimizer line
    if args.optimizer == "leo":
        return leo_dist.ShardedLeo(groups, lr=args.lr, grad_comm=args.grad_comm)
    plain = [{k: v for k, v in g.items() if k != "orthogonalize"} for g in groups]
    return leo_dist.ShardedLion(plain, lr=args.lr, grad_comm=args.grad_comm)


def checkpoint_state(model, opt, sharded):
    optim = opt.sharded_state_dict() if sharded else get_optimizer_state_dict(model, opt)
    return {"model": model.module.state_dict(), "optim": optim}


def save(args, model, opt, sharded, scaler, step, rank):
    path = os.path.join(args.ckpt_dir, f"step_{step:06d}")
    state = checkpoint_state(model, opt, sharded)
    state["meta"] = json.dumps({"step": step, "scaler": scaler.state_dict() if scaler else None})  # one leaf
    dcp.save(state, checkpoint_id=path)  # every rank writes its own part (the sharded momentum)
    return path


def load(args, model, opt, sharded, scaler):
    state = checkpoint_state(model, opt, sharded)
    state["meta"] = ""
    dcp.load(state, checkpoint_id=args.resume)
    meta = json.loads(state["meta"])
    model.module.load_state_dict(state["model"])
    if sharded:
        opt.load_sharded_state_dict(state["optim"])
    else:
        set_optimizer_state_dict(model, opt, state["optim"])
    if scaler and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return meta["step"]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)

    train_ids, _, vocab = load_corpus(max_chars=args.max_chars)
    shape = dict(PRESETS[args.preset])
    for key in ("n_layer", "n_embd", "block_size"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    cfg = GPTConfig(vocab_size=vocab, **shape)
    torch.manual_seed(args.seed)
    model = DDP(GPT(cfg).to(device))
    opt = build_optimizer(args, model.module)
    sharded = args.optimizer != "adamw"
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.scaler else None
    if sharded:
        leo_dist.hooks.attach(model, opt, grad_scaler=scaler)  # [leo_dist] the hook line

    start = load(args, model, opt, sharded, scaler) if args.resume else 0
    log(f"{args.optimizer}: {sum(p.numel() for p in model.parameters()):,} parameters, W={world}, "
        f"start at step {start}")
    losses = []
    end = args.stop_at or args.steps
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            g = torch.Generator().manual_seed(((args.seed * 100_003 + rank) * 100_003 + step) * 101 + micro)
            x, y = (t.to(device) for t in get_batch(train_ids, args.batch_size, cfg.block_size, g))
            model.require_backward_grad_sync = micro == args.grad_accum - 1  # sync on the last micro-step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                _, loss = model(x, y)
            loss = loss / args.grad_accum
            total += loss.detach()
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if args.clip > 0:
            if sharded:
                opt.clip_grad_norm_(args.clip)  # [leo_dist] on the averaged gradients
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if step % args.log_every == 0 or step == end - 1:
            log(f"step {step:5d} | loss {losses[-1]:.4f} | lr {lr_at(args, step):.2e}")
        if args.ckpt_dir and ((args.ckpt_every and (step + 1) % args.ckpt_every == 0) or step == end - 1):
            log(f"checkpoint -> {save(args, model, opt, sharded, scaler, step + 1, rank)}")
    if rank == 0 and args.out:
        h = hashlib.sha256()
        for p in model.module.parameters():
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        with open(args.out, "w") as f:
            json.dump({"start": start, "losses": losses, "params_sha256": h.hexdigest()}, f)
    # DDP's reducer holds the process group from C++ and frees it with the GIL held; if that is
    # the last reference, gloo's worker joins can wait on the GIL forever (seen 1 run in 8 here).
    # Dropping the model first leaves the last reference to destroy_process_group, which
    # releases the GIL.
    del model, opt
    # A rank that tears gloo down while a peer is still finishing the last collective (here DCP's
    # closing broadcast, or the loss all-reduce) can abort that peer with "terminate called without
    # an active exception" (seen once in CI): leave together.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
