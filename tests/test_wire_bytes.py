"""Bytes on the wire, counted by the kernel: loopback of a private network namespace (needs root)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "tools", "wire_probe.py")


def _can_make_netns() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating a network namespace needs root"
    return None


@pytest.fixture(scope="module")
def netns():
    why = _can_make_netns()
    if why:
        pytest.skip(why)
    name = f"leo-wire-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _wire(netns: str, world: int, mode: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["ip", "netns", "exec", netns, sys.executable, PROBE, str(world), mode],
                         capture_output=True, text=True, timeout=600, env=env)
    lines = [l for l in run.stdout.splitlines() if l.startswith("WIRE ")]
    assert run.returncode == 0 and lines, run.stdout + run.stderr
    return float(lines[-1].split()[2])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_lion_bytes_on_the_wire_vs_ddp(netns, world):
    ddp = _wire(netns, world, "ddp")
    fp32 = _wire(netns, world, "lion_fp32")
    bf16 = _wire(netns, world, "lion_bf16")
    print(f"W={world}: DDP {ddp:.0f} B/step, ShardedLion fp32 {fp32:.0f} ({fp32 / ddp:.3f}x), "
          f"bf16 {bf16:.0f} ({bf16 / ddp:.3f}x)")
    assert fp32 <= 0.55 * ddp
    assert bf16 <= 0.28 * ddp
