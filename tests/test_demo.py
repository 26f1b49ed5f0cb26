"""launch/train.py end to end: world sizes 1 and 2 (torchrun on gloo), output, and exact resume.

The multi-rank runs go through a real ``torchrun --standalone`` subprocess so that the
environment-variable rendezvous the demo relies on is what gets tested; each has a timeout so a
hung collective fails the test instead of the CI job. Console lines are read with regexes that
take the numbers out (units included) and tolerate spacing; exact values come from the metrics file.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
TIMEOUT_S = 120
# Small enough that a step takes milliseconds on one core; the point is the plumbing, not the loss.
FAST = ["--preset", "tiny", "--batch-size", "4", "--eval-batches", "2", "--max-chars", "200000",
        "--log-interval", "1", "--no-progress"]

sys.path.insert(0, str(ROOT))
from launch import cli, optimizers, traffic  # noqa: E402
from launch.gpt import GPT, PRESETS, GPTConfig, load_corpus  # noqa: E402

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
BYTES = r"(\d[\d,]*(?:\.\d+)?)\s*([KMG]?B)\b"  # what the demo prints for a byte count: "1.72 MB", "0 B"
NUM = r"(\d+(?:\.\d+)?)"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_demo(args: list[str], nproc: int = 1) -> str:
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(TRAIN), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}")
    return proc.stdout


def train_losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def math_finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


def to_bytes(number: str, unit: str) -> float:
    return float(number.replace(",", "")) * UNITS[unit]


def find(pattern: str, out: str) -> re.Match:
    m = re.search(pattern, out, re.M)
    assert m, f"no line matches {pattern!r} in:\n{out}"
    return m


def step_lines(out: str) -> list[tuple[int, int, float, float]]:
    """``(step, steps, loss, sent bytes)`` of every ``step`` log line."""
    pat = rf"^step\s+(\d+)\s*/\s*(\d+)\s*\|\s*loss\s+{NUM}\s*\|.*\|\s*sent\s+{BYTES}\s*/\s*step\s*/\s*rank"
    return [(int(a), int(b), float(c), to_bytes(d, u)) for a, b, c, d, u in re.findall(pat, out, re.M)]


def header_n_and_ddp_bytes(out: str) -> tuple[int, float]:
    """Parameter count N and the DDP fp32 reference bytes that the demo's ``bytes:`` line reports."""
    m = find(rf"^bytes:.*?=\s*{BYTES}\s+sent per rank per step\s*\(W\s*=\s*\d+,\s*N\s*=\s*(\d+)\)", out)
    return int(m.group(3)), to_bytes(m.group(1), m.group(2))


def summary_kind_bytes(out: str, kind: str) -> float:
    m = find(rf"^\s+{kind}\s+{BYTES}\s+sent in\s+\d+\s+call", out)
    return to_bytes(m.group(1), m.group(2))


def model_size(preset: str = "tiny", max_chars: int = 200_000) -> int:
    """Elements of the demo's model, counted here from its tensors (not from the demo's report)."""
    vocab = load_corpus(max_chars=max_chars)[2]
    return sum(p.numel() for p in GPT(GPTConfig(vocab_size=vocab, **PRESETS[preset])).parameters())


def test_world_of_one_runs_reports_and_resumes_exactly(tmp_path):
    """Plain ``python launch/train.py``: output lines, and 3 steps + resume to 6 == 6 straight steps."""
    common = [*FAST, "--steps", "6", "--optimizer", "sharded_leo"]
    full, part = tmp_path / "full", tmp_path / "part"
    out = run_demo([*common, "--checkpoint-dir", str(full), "--resume", "latest",
                    "--metrics-file", str(tmp_path / "full.jsonl")])
    find(r"no checkpoint in", out)  # 'latest' in an empty directory starts from scratch
    steps = step_lines(out)
    assert [s[:2] for s in steps] == [(k, 6) for k in range(1, 7)], out
    assert all(0 < s[2] < 10 and s[3] == 0 for s in steps), out  # a world of one sends nothing
    n, ddp_bytes = header_n_and_ddp_bytes(out)
    assert n == model_size() and ddp_bytes == 0, out
    assert 0 < float(find(rf"^eval\s+6\s*/\s*6\s*\|\s*val loss\s+{NUM}", out).group(1)) < 10, out
    find(r"^\s+ratio vs DDP fp32\s+n/a", out)
    summary = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["world_size"] == 1 and math_finite(summary["final_loss"])
    assert [p.name for p in full.iterdir()] == ["ckpt_00000006"]  # written atomically: no tmp left

    run_demo([*common, "--checkpoint-dir", str(part), "--stop-at-step", "3"])
    assert [p.name for p in part.iterdir()] == ["ckpt_00000003"]
    out = run_demo([*common, "--checkpoint-dir", str(part), "--resume", "latest",
                    "--metrics-file", str(tmp_path / "resumed.jsonl")])
    find(r"resumed from .+ at step\s+3\b", out)
    a, b = train_losses(tmp_path / "full.jsonl"), train_losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def run_world_of_two(extra: list[str], metrics: Path) -> tuple[str, list[dict]]:
    out = run_demo([*FAST, "--steps", "3", *extra, "--metrics-file", str(metrics)], nproc=2)
    steps = step_lines(out)
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)] and all(0 < s[2] < 10 for s in steps), out
    find(r"world\s+2\s*\(gloo,\s*cpu\)", out)
    # each step line's ratio is its sent bytes over the DDP fp32 reference, to the printed digits
    ddp_bytes = header_n_and_ddp_bytes(out)[1]
    ratios = [float(r) for r in re.findall(rf"^step\s.*\(\s*{NUM}\s*x\s+DDP fp32\)", out, re.M)]
    assert len(ratios) == 3 and all(r == pytest.approx(s[3] / ddp_bytes, rel=0.01, abs=1e-3)
                                    for r, s in zip(ratios, steps)), out
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    return out, records


def test_world_of_two_sharded_lion_bytes_match_its_own_accounting(tmp_path):
    """Through DDP and leo_dist.hooks, bf16 gradients + 1-bit updates: (2 + 1/8)/8 of DDP fp32 at W=2.

    The demo's DDP figure is a cost model; the optimizer counts its own bytes. They must agree:
    a ring all-reduce sends twice a reduce-scatter, so the bf16 reduce-scatter is a quarter of the
    fp32 all-reduce; the update all-gather is 1 bit an element, plus a zero bitmap where needed.
    """
    out, records = run_world_of_two(["--optimizer", "sharded_lion", "--ddp", "--grad-comm", "bf16",
                                     "--clip-grad-norm", "1.0"], tmp_path / "m.jsonl")
    n, ddp_bytes = header_n_and_ddp_bytes(out)
    assert n == model_size(), out
    assert ddp_bytes == pytest.approx(2 * (2 - 1) / 2 * 4 * n, rel=5e-3), out  # printed to 3 digits
    ratio = float(find(rf"^\s+ratio vs DDP fp32\s+{NUM}", out).group(1))
    assert 0 < ratio <= 0.3, out
    rs, ag = summary_kind_bytes(out, "reduce_scatter"), summary_kind_bytes(out, "all_gather")
    assert rs == pytest.approx(ddp_bytes / 4, rel=0.01), out  # padding to the buckets' shards only
    assert n / 16 * 0.995 <= ag <= n / 8 * 1.01, out  # (W-1)/W of N bits, at most twice with bitmaps
    train = [r for r in records if r["kind"] == "train"]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["ddp_fp32_bytes_per_step"] == 2 * (2 - 1) / 2 * 4 * n
    assert summary["sent_bytes_per_step"] == pytest.approx(sum(r["sent_bytes"] for r in train) / 3)
    assert summary["ratio_vs_ddp_fp32"] == pytest.approx(summary["sent_bytes_per_step"] / (4 * n))


def test_world_of_two_adamw_ddp_bytes_match_model_size(tmp_path):
    """The baseline, plain DDP: the demo reports its fp32 ring all-reduce of every parameter."""
    out, records = run_world_of_two(["--optimizer", "adamw", "--ddp"], tmp_path / "m.jsonl")
    n = model_size()
    assert header_n_and_ddp_bytes(out)[0] == n, out
    ring = 2 * (2 - 1) / 2 * 4 * n  # bytes one rank sends in a ring all-reduce of n fp32 values, W=2
    assert [r["sent_bytes"] for r in records if r["kind"] == "train"] == [ring] * 3
    assert all(s[3] == pytest.approx(ring, rel=5e-3) for s in step_lines(out)), out


def test_world_of_two_powersgd_bytes_are_its_factors_after_warmup(tmp_path):
    """DDP + torch's PowerSGD hook: plain all-reduce for 10 steps, then every 2-D tensor whose
    rank-4 factors are at least 2x smaller travels as them (counted here from the tensors)."""
    argv = [*FAST, "--steps", "12", "--optimizer", "lion", "--ddp", "--grad-comm", "powersgd",
            "--metrics-file", str(tmp_path / "m.jsonl")]
    out = run_demo(argv, nproc=2)
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    vocab = load_corpus(max_chars=200_000)[2]
    elems = 0
    for p in GPT(GPTConfig(vocab_size=vocab, **PRESETS["tiny"])).parameters():
        rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.ndim >= 2 else (0, 0)
        small = rows and (rows + cols) * 4 * 2 < p.numel()
        elems += (rows + cols) * 4 if small else p.numel()
    ring = 2 * (2 - 1) / 2 * 4  # bytes per fp32 element one rank sends in a ring all-reduce, W=2
    sent = {r["step"]: r["sent_bytes"] for r in records if r["kind"] == "train"}
    assert sent == {s: ring * (model_size() if s <= 10 else elems) for s in range(1, 13)}, out
    assert elems < model_size() / 5
    assert records[-1]["val_loss"] < records[0]["loss"], out


def test_world_of_two_resume_matches_uninterrupted_run(tmp_path):
    """Sharded Leo at W=2 (standalone): the collective state_dict round trip gives the same losses."""
    common = [*FAST, "--steps", "6", "--optimizer", "sharded_leo", "--clip-grad-norm", "1.0"]
    out = run_demo([*common, "--checkpoint-dir", str(tmp_path / "full"), "--checkpoint-interval", "3",
                    "--metrics-file", str(tmp_path / "full.jsonl")], nproc=2)
    last = step_lines(out)[-1]
    assert last[:2] == (6, 6) and last[3] > 0, out
    ratio = float(find(rf"sent\s+{BYTES}\s*/\s*step\s*/\s*rank\s*\(\s*{NUM}\s*x\s+DDP fp32\)", out).group(3))
    assert 0 < ratio < 1, out
    assert summary_kind_bytes(out, "reduce_scatter") > 0, out
    ckpt = tmp_path / "full" / "ckpt_00000003"
    assert ckpt.is_dir()
    out = run_demo([*common, "--checkpoint-dir", str(tmp_path / "resumed"), "--resume", str(ckpt),
                    "--metrics-file", str(tmp_path / "resumed.jsonl")], nproc=2)
    find(r"at step\s+3\b", out)
    a, b = train_losses(tmp_path / "full.jsonl"), train_losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be >= 1"),
    (["--lr", "-1"], "must be in"),
    (["--lr", "nan"], "must be in"),
    (["--optimizer", "sharded_lion", "--update-comm", "1bit"], "--update-comm only applies"),
    (["--optimizer", "leo", "--grad-comm", "1bit"], "needs a sharded optimizer"),
    (["--grad-comm", "bf16", "--warmup-grad-comm", "bf16"], "--warmup-grad-comm only applies"),
    (["--optimizer", "adamw", "--grad-comm", "bf16"], "add --ddp"),
    (["--optimizer", "lion", "--grad-comm", "powersgd"], "needs a non-sharded optimizer"),
    (["--optimizer", "sharded_lion", "--ddp", "--grad-comm", "powersgd"], "needs a non-sharded optimizer"),
    (["--optimizer", "lion", "--ddp", "--grad-comm", "powersgd", "--checkpoint-dir", "x"], "error-feedback"),
    (["--resume", "latest"], "needs --checkpoint-dir"),
    (["--checkpoint-interval", "5"], "needs --checkpoint-dir"),
    (["--steps", "10", "--stop-at-step", "11"], "must not exceed"),
    (["--steps", "10", "--warmup-steps", "10"], "must be smaller than --steps"),
    (["--preset", "huge"], "invalid choice"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_lr_schedule_is_a_function_of_the_step():
    args = cli.parse_args(["--steps", "100", "--warmup-steps", "10"])
    assert optimizers.lr_factor(args, 5) == pytest.approx(0.5)
    assert optimizers.lr_factor(args, 10) == pytest.approx(1.0)
    assert optimizers.lr_factor(args, 100) == pytest.approx(0.1)
    assert traffic.ddp_reference_bytes(1000, 4) == 2 * 3 / 4 * 4 * 1000
    assert traffic.ddp_reference_bytes(1000, 1) == 0


def test_cli_passes_the_warmup_wire_to_the_optimizer():
    model = torch.nn.Linear(4, 3)
    args = cli.parse_args(["--optimizer", "sharded_lion", "--grad-comm", "1bit", "--warmup-grad-comm", "bf16"])
    assert optimizers.build_optimizer(args, model).warmup_grad_comm == "bf16"
    assert optimizers.build_optimizer(cli.parse_args(["--grad-comm", "1bit"]), model).warmup_grad_comm == "fp32"
