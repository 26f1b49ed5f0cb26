"""launch/train.py end to end: world sizes 1 and 2 (torchrun on gloo), output, and exact resume.

The multi-rank runs go through a real ``torchrun --standalone`` subprocess so that the
environment-variable rendezvous the demo relies on is what gets tested; each has a timeout so a
hung collective fails the test instead of the CI job.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
TIMEOUT_S = 120
# Small enough that a step takes milliseconds on one core; the point is the plumbing, not the loss.
FAST = ["--preset", "tiny", "--batch-size", "4", "--eval-batches", "2", "--max-chars", "200000",
        "--log-interval", "1", "--no-progress"]

sys.path.insert(0, str(ROOT))
from launch import train as train_mod  # noqa: E402


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


def test_world_of_one_runs_and_reports(tmp_path):
    out = run_demo([*FAST, "--steps", "3", "--optimizer", "sharded_leo", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert re.search(r"^step +3/3 \| loss \d+\.\d+ .*\| sent 0 B/step/rank", out, re.M), out
    assert "cost model 2*(W-1)/W*4*N" in out
    assert re.search(r"^eval +3/3 \| val loss \d+\.\d+", out, re.M), out
    assert "ratio vs DDP fp32    n/a" in out
    summary = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["world_size"] == 1 and math_finite(summary["final_loss"])


def math_finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


@pytest.mark.parametrize("extra, max_ratio", [
    # fp32 gradients (4 B/elem) + fp32 matrix updates (exact Leo): about DDP's 8 B/elem at W=2.
    (["--optimizer", "sharded_leo"], 1.0),
    # bf16 gradients + 1-bit updates: (2 + 1/8)/8 of DDP fp32.
    (["--optimizer", "sharded_lion", "--grad-comm", "bf16", "--clip-grad-norm", "1.0"], 0.3),
    (["--optimizer", "sharded_lion", "--ddp"], 0.6),
    (["--optimizer", "adamw", "--ddp"], 1.0),
])
def test_world_of_two_runs_and_reports_bytes(extra, max_ratio):
    out = run_demo([*FAST, "--steps", "3", *extra], nproc=2)
    losses = [float(x) for x in re.findall(r"^step +\d+/3 \| loss (\d+\.\d+)", out, re.M)]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses), out
    assert re.search(r"world 2 \(gloo, cpu\)", out), out
    assert re.search(r"\| sent \d+(\.\d+)? [KM]B/step/rank \(\d\.\d{3}x DDP fp32\)", out), out
    ratio = float(re.search(r"ratio vs DDP fp32 +(\d+\.\d+)", out).group(1))
    assert 0 < ratio <= max_ratio, out
    assert "Traceback" not in out


def test_resume_matches_uninterrupted_run(tmp_path):
    common = [*FAST, "--steps", "6", "--optimizer", "sharded_leo", "--clip-grad-norm", "1.0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_demo([*common, "--checkpoint-dir", str(full), "--checkpoint-interval", "3",
              "--metrics-file", str(tmp_path / "full.jsonl")], nproc=2)
    # The interrupted run: stop after the step-3 checkpoint, then continue from it.
    run_demo([*common, "--checkpoint-dir", str(part), "--stop-at-step", "3",
              "--metrics-file", str(tmp_path / "part.jsonl")], nproc=2)
    assert sorted(p.name for p in part.iterdir()) == ["ckpt_00000003.pt"]
    out = run_demo([*common, "--checkpoint-dir", str(part), "--resume", "latest",
                    "--metrics-file", str(tmp_path / "resumed.jsonl")], nproc=2)
    assert "resumed from" in out and "at step 3" in out, out

    a, b = train_losses(tmp_path / "full.jsonl"), train_losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    # The first three steps of the interrupted run are the uninterrupted run's too.
    c = train_losses(tmp_path / "part.jsonl")
    assert all(c[s] == a[s] for s in (1, 2, 3))


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    out = run_demo([*FAST, "--steps", "2", "--optimizer", "lion", "--checkpoint-dir", str(tmp_path / "ck"),
                    "--resume", "latest"])
    assert "no checkpoint in" in out
    assert (tmp_path / "ck" / "ckpt_00000002.pt").is_file()
    assert not [p for p in (tmp_path / "ck").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be >= 1"),
    (["--lr", "-1"], "must be in"),
    (["--lr", "nan"], "must be in"),
    (["--optimizer", "sharded_lion", "--update-comm", "1bit"], "--update-comm only applies"),
    (["--optimizer", "leo", "--grad-comm", "1bit"], "needs a sharded optimizer"),
    (["--optimizer", "adamw", "--grad-comm", "bf16"], "add --ddp"),
    (["--resume", "latest"], "needs --checkpoint-dir"),
    (["--checkpoint-interval", "5"], "needs --checkpoint-dir"),
    (["--steps", "10", "--stop-at-step", "11"], "must not exceed"),
    (["--steps", "10", "--warmup-steps", "10"], "must be smaller than --steps"),
    (["--preset", "huge"], "invalid choice"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_lr_schedule_is_a_function_of_the_step():
    args = train_mod.parse_args(["--steps", "100", "--warmup-steps", "10"])
    assert train_mod.lr_factor(args, 5) == pytest.approx(0.5)
    assert train_mod.lr_factor(args, 10) == pytest.approx(1.0)
    assert train_mod.lr_factor(args, 100) == pytest.approx(0.1)
    assert train_mod.ddp_reference_bytes(1000, 4) == 2 * 3 / 4 * 4 * 1000
    assert train_mod.ddp_reference_bytes(1000, 1) == 0
