"""Restart after a fault: torchrun --max-restarts 1 brings a SIGKILLed worker group back from its
last checkpoint, and the run ends bitwise where an uninterrupted one ends.

``LEO_DIST_FAULT_AT_STEP=<step>:<rank>`` (launch/faults.py) makes that rank kill itself with
SIGKILL after backward at ``<step>``, on the first attempt only; the other rank is then inside the
step's first collective. torchrun stops the group and starts it again with the same argv, whose
``--resume latest`` now finds the last checkpoint. With sharded Lion and fp32 gradients every
step is exact, so the final parameters (SHA-256 of the model's state_dict) and every logged loss
equal the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_demo import FAST, ROOT, TRAIN, _env

STEPS, INTERVAL, FAULT_STEP = 8, 3, 5  # checkpoints at 3 and 6: the restart resumes from 3
TIMEOUT_S = 150


def torchrun(tmp: Path, name: str, fault: str | None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    metrics = tmp / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "--monitor-interval=0.1", str(TRAIN), *FAST, "--steps", str(STEPS),
           "--optimizer", "sharded_lion", "--grad-comm", "fp32", "--checkpoint-dir", str(tmp / name),
           "--checkpoint-interval", str(INTERVAL), "--resume", "latest", "--metrics-file", str(metrics),
           "--dist-timeout", "30"]
    env = _env()
    env.pop("LEO_DIST_FAULT_AT_STEP", None)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    if fault:
        env["LEO_DIST_FAULT_AT_STEP"] = fault
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name}: torchrun did not finish in {TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc, [json.loads(x) for x in metrics.read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    """The last logged loss of every step (a restarted run logs steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_sigkilled_worker_restarts_from_last_checkpoint_and_matches_uninterrupted_run(tmp_path):
    _, clean = torchrun(tmp_path, "clean", None)
    proc, faulty = torchrun(tmp_path, "faulty", f"{FAULT_STEP}:1")

    # the fault happened: torchrun saw a worker die by SIGKILL and restarted the group once
    assert re.search(r"exitcode: -9\) local_rank: 1", proc.stderr), proc.stderr[-4000:]
    print("\n".join(line for line in proc.stderr.splitlines() if "estart" in line or "exitcode" in line))
    resumes = [r for r in faulty if r["kind"] == "resume"]
    assert resumes == [{"kind": "resume", "step": INTERVAL, "path": str(tmp_path / "faulty" / f"ckpt_{INTERVAL:08d}"),
                        "restart": 1}], resumes
    assert not any(r["kind"] == "resume" for r in clean)
    # the first attempt got as far as the step before the fault, then nothing until the resume
    first = [r["step"] for r in faulty[: faulty.index(resumes[0])] if r["kind"] == "train"]
    assert first == list(range(1, FAULT_STEP)), first

    a, b = losses(clean), losses(faulty)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # bitwise: every loss of the restarted run is the uninterrupted run's
    (sa,), (sb,) = [r for r in clean if r["kind"] == "summary"], [r for r in faulty if r["kind"] == "summary"]
    assert sa["replicas_equal"] is True and sb["replicas_equal"] is True
    assert len(sa["params_sha256"]) == 64 and sa["params_sha256"] == sb["params_sha256"]
    assert sa["val_loss"] == sb["val_loss"]
    assert sorted(os.listdir(tmp_path / "faulty")) == ["ckpt_00000003", "ckpt_00000006", "ckpt_00000008"]
