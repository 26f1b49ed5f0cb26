"""Test-only fault injection: ``LEO_DIST_FAULT_AT_STEP=<step>:<rank>`` makes that rank kill itself.

The rank sends itself ``SIGKILL`` at step ``<step>``, after backward and before ``opt.step()``,
so that its peers are left inside the step's first collective: what a crashed or OOM-killed
worker looks like to them. It fires on the first attempt only (``TORCHELASTIC_RESTART_COUNT``
absent or 0), so that ``torchrun --max-restarts 1 ... --resume latest`` restarts the group from
the last checkpoint and finishes. Unset or empty: nothing happens.
"""
from __future__ import annotations

import os
import signal

ENV = "LEO_DIST_FAULT_AT_STEP"


def parse(value: str | None) -> tuple[int, int] | None:
    """``"<step>:<rank>"`` → ``(step, rank)``; None when unset or empty."""
    if not value:
        return None
    try:
        step, rank = (int(x) for x in value.split(":"))
    except ValueError:
        raise SystemExit(f"error: {ENV} must be <step>:<rank> (two integers), got {value!r}") from None
    if step < 1 or rank < 0:
        raise SystemExit(f"error: {ENV}: step must be >= 1 and rank >= 0, got {value!r}")
    return step, rank


def restart_count() -> int:
    """Which attempt this is under torchrun (0: the first; also 0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class FaultInjector:
    def __init__(self, rank: int, environ=os.environ):
        target = parse(environ.get(ENV))
        self.step = target[0] if target and target[1] == rank and restart_count() == 0 else None

    def at(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
