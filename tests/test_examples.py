"""examples/train_gpt.py end to end under torchrun (W = 2, gloo): the loss falls with DDP + AdamW
and with leo_dist (ShardedLeo + the DDP hook), a leo_dist run resumed from a mid-run DCP checkpoint
equals the uninterrupted one bitwise, and bf16 autocast + GradScaler runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gpt.py"
TIMEOUT_S = 300
STEPS, HALF = 20, 10
SMALL = ["--n-layer", "1", "--n-embd", "64", "--block-size", "32", "--batch-size", "8", "--grad-accum", "2",
         "--steps", str(STEPS), "--warmup", "4", "--max-chars", "200000", "--log-every", "5"]


def run(tmp: Path, name: str, *extra: str) -> dict:
    out = tmp / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT),
           *SMALL, "--out", str(out), *extra]
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.slow
def test_example_trains_with_adamw_and_leo_dist_and_resumes_exactly(tmp_path):
    adamw = run(tmp_path, "adamw", "--optimizer", "adamw")
    leo = run(tmp_path, "leo", "--optimizer", "leo")
    for result in (adamw, leo):
        first, last = result["losses"][0], result["losses"][-1]
        assert last < first - 0.5, result["losses"]
    ckpt = tmp_path / "ckpt"
    half = run(tmp_path, "half", "--optimizer", "leo", "--stop-at", str(HALF), "--ckpt-dir", str(ckpt))
    assert half["losses"] == leo["losses"][:HALF]
    resumed = run(tmp_path, "resumed", "--optimizer", "leo", "--resume", str(ckpt / f"step_{HALF:06d}"))
    assert resumed["start"] == HALF
    assert resumed["losses"] == leo["losses"][HALF:]
    assert resumed["params_sha256"] == leo["params_sha256"]


@pytest.mark.slow
def test_example_runs_with_bf16_autocast_and_grad_scaler(tmp_path):
    result = run(tmp_path, "amp", "--optimizer", "lion", "--amp", "--scaler", "--steps", "6", "--grad-comm", "bf16")
    assert len(result["losses"]) == 6 and all(x == x and x < 10 for x in result["losses"])
