"""Command-line flags of launch/train.py: the parser, its defaults, and the checks that reject bad combinations."""
from __future__ import annotations

import argparse
import math

from launch.gpt import PRESETS
from launch.optimizers import (DEFAULT_LR, DEFAULT_WD, OPTIMIZERS, SHARDED, SHARDED_IMPORT_ERROR, ShardedLeo,
                               family)


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
                   help="model size from launch/gpt.py: tiny ~0.4M, small ~3M, 10m ~11M, 50m ~49M parameters (default: tiny)")
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
    g.add_argument("--grad-comm", choices=("fp32", "bf16", "1bit", "powersgd"), default="fp32",
                   help="wire dtype of the gradient reduce-scatter of the sharded optimizers. With a "
                        "non-sharded optimizer and --ddp, bf16 registers torch's bf16 compress hook "
                        "(NCCL only) and powersgd torch's PowerSGD hook (rank 4, error feedback, plain "
                        "all-reduce for the first 10 steps); 1bit is sharded-only (default: fp32)")
    g.add_argument("--grad-comm-warmup", type=_int_at_least(0), default=None, metavar="STEPS",
                   help="with --grad-comm 1bit: steps that still send uncompressed gradients first "
                        "(default: the optimizer's)")
    g.add_argument("--warmup-grad-comm", choices=("fp32", "bf16"), default=None,
                   help="with --grad-comm 1bit: the wire dtype of those warm-up steps (default: the "
                        "optimizer's, fp32; bf16 halves their bytes)")
    g.add_argument("--update-comm", choices=("exact", "bf16", "1bit"), default="exact",
                   help="sharded_leo only: how Leo's 2-D updates travel: exact (parameter dtype), bf16 "
                        "(rounded to bfloat16) or 1bit (signs + scales with error feedback) (default: exact)")
    g.add_argument("--ranks-per-node", default=None, metavar="G|auto",
                   help="sharded optimizers only: the topology-aware exchange with G ranks per node ('auto': "
                        "torchrun's LOCAL_WORLD_SIZE); gradients cross nodes once, as each node's sums "
                        "(default: the flat exchange)")
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
                   help="directory for checkpoints ckpt_<step>/ (DCP); none are written without it")
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
    fam = family(args.optimizer)
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
    if args.warmup_grad_comm is not None and args.grad_comm != "1bit":
        parser.error("--warmup-grad-comm only applies with --grad-comm 1bit")
    if args.ranks_per_node is not None:
        if not sharded:
            parser.error("--ranks-per-node needs a sharded optimizer (sharded_leo or sharded_lion)")
        if args.ranks_per_node != "auto":
            try:
                args.ranks_per_node = int(args.ranks_per_node)
            except ValueError:
                parser.error(f"--ranks-per-node must be an integer or 'auto', got {args.ranks_per_node!r}")
    if not sharded and args.grad_comm == "1bit":
        parser.error("--grad-comm 1bit needs a sharded optimizer (sharded_leo or sharded_lion)")
    if args.grad_comm == "powersgd" and (sharded or not args.ddp):
        parser.error("--grad-comm powersgd is DDP's PowerSGD hook: it needs a non-sharded optimizer "
                     "(leo, lion or adamw) and --ddp")
    if args.grad_comm == "powersgd" and args.checkpoint_dir:
        # the hook's error feedback and warm-start factors are not in the checkpoint: a resume
        # would silently drop what the compressor still owes the gradients
        parser.error("--grad-comm powersgd does not checkpoint the hook's error-feedback state; "
                     "drop --checkpoint-dir")
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
                     f"does not provide ({SHARDED_IMPORT_ERROR}); use leo/lion/adamw with --ddp")
    return args
