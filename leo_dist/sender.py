"""A background thread that sends the gradient exchange while backward keeps computing.

Why a thread. The exchange sends each bucket in blocks through a small pool of buffers (bounded
memory, see :mod:`leo_dist.exchange`); refilling the pool means waiting for the oldest block to
leave. Done inside the DDP hook, that wait stops backward until the wire has caught up, so on a
slow link nearly all of the exchange shows in the step (measured: 89% of the wire time exposed).
The hook now hands the bucket to :class:`BackgroundSender` and returns at once; the thread fills,
launches and waits, block after block, while autograd computes the next gradients. The waits
release the GIL (``Work.wait`` and the copies are C++), so backward and the wire run together.

Ordering. Collectives must be issued in the same order on every rank. The sender runs one job at
a time, in submission order, and submissions follow DDP's bucket order, which is the same on
every rank. The thread issues its collectives on a process group of its own (a duplicate of the
optimizer's, :meth:`leo_dist.collectives.Comm.duplicate`), so nothing the main or autograd thread
issues meanwhile (DDP's unused-parameter all-reduce, the hook's all-reduce of gradients the
optimizer does not hold) can interleave differently on different ranks.

Errors. A job that raises (a peer died, a timeout) stops the jobs queued behind it; the error is
raised in the caller of :meth:`BackgroundSender.drain`, that is, in ``step()``, within the group's
timeout.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

__all__ = ["BackgroundSender"]


class BackgroundSender:
    """Runs submitted jobs one at a time, in submission order, on one daemon thread (started at
    the first submission, idle between steps, gone with the process). :meth:`drain` waits until
    every job so far has run."""

    def __init__(self, name: str = "leo_dist-sender"):
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._done:
            self._pending += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:  # after a failure, the queued jobs are dropped
                    job()
            except BaseException as e:  # noqa: BLE001 - re-raised by drain() in the main thread
                self._error = e
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has run; raise the first error one of them raised
        (once: the sender is usable again afterwards)."""
        with self._done:
            while self._pending:
                self._done.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error
