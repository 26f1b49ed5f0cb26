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


def math_finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


def test_world_of_one_runs_reports_and_resumes_exactly(tmp_path):
    """Plain ``python launch/train.py``: output lines, and 3 steps + resume to 6 == 6 straight steps."""
    common = [*FAST, "--steps", "6", "--optimizer", "sharded_leo"]
    full, part = tmp_path / "full", tmp_path / "part"
    out = run_demo([*common, "--checkpoint-dir", str(full), "--resume", "latest",
                    "--metrics-file", str(tmp_path / "full.jsonl")])
    assert "no checkpoint in" in out, out  # 'latest' in an empty directory starts from scratch
    assert re.search(r"^step +6/6 \| loss \d+\.\d+ .*\| sent 0 B/step/rank", out, re.M), out
    assert "cost model 2*(W-1)/W*4*N" in out
    assert re.search(r"^eval +6/6 \| val loss \d+\.\d+", out, re.M), out
    assert "ratio vs DDP fp32    n/a" in out
    summary = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["world_size"] == 1 and math_finite(summary["final_loss"])
    assert [p.name for p in full.iterdir()] == ["ckpt_00000006.pt"]  # written atomically: no tmp left

    run_demo([*common, "--checkpoint-dir", str(part), "--stop-at-step", "3"])
    assert [p.name for p in part.iterdir()] == ["ckpt_00000003.pt"]
    out = run_demo([*common, "--checkpoint-dir", str(part), "--resume", "latest",
                    "--metrics-file", str(tmp_path / "resumed.jsonl")])
    assert "resumed from" in out and "at step 3" in out, out
    a, b = train_losses(tmp_path / "full.jsonl"), train_losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


@pytest.mark.parametrize("extra, max_ratio", [
    # Through DDP and leo_dist.hooks, bf16 gradients + 1-bit updates: (2 + 1/8)/8 of DDP fp32 at W=2.
    (["--optimizer", "sharded_lion", "--ddp", "--grad-comm", "bf16", "--clip-grad-norm", "1.0"], 0.3),
    # The baseline: plain DDP; its bytes are the cost model itself.
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


def test_world_of_two_resume_matches_uninterrupted_run(tmp_path):
    """Sharded Leo at W=2 (standalone): the collective state_dict round trip gives the same losses."""
    common = [*FAST, "--steps", "6", "--optimizer", "sharded_leo", "--clip-grad-norm", "1.0"]
    out = run_demo([*common, "--checkpoint-dir", str(tmp_path / "full"), "--checkpoint-interval", "3",
                    "--metrics-file", str(tmp_path / "full.jsonl")], nproc=2)
    assert re.search(r"^step +6/6 \| loss \d+\.\d+ .*\| sent [\d.]+ [KM]B/step/rank \(\d\.\d{3}x DDP fp32\)",
                     out, re.M), out
    assert re.search(r"^ +reduce_scatter +[\d.]+ [KM]B sent", out, re.M), out
    ckpt = tmp_path / "full" / "ckpt_00000003.pt"
    assert ckpt.is_file()
    out = run_demo([*common, "--checkpoint-dir", str(tmp_path / "resumed"), "--resume", str(ckpt),
                    "--metrics-file", str(tmp_path / "resumed.jsonl")], nproc=2)
    assert "at step 3" in out, out
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
