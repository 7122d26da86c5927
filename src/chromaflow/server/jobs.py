"""The job queue and the one worker thread that owns the model.

Jobs run strictly one at a time in priority order: ComfyUI's rule, a counter that grows for normal jobs and is
negated for `front` ones (or a client-given `number`). The queue is bounded so a flood of clients gets a clear
503 instead of unbounded memory; shutdown lets the running job finish (interrupting it after a grace period) and
cancels the pending ones through their `on_cancel`, so no job disappears without a recorded outcome.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class Rejected(Exception):
    """The queue cannot take the job (full or shutting down); the message is the reason given to the client."""


class Cancelled(Exception):
    """A job removed before it ran."""


@dataclass(eq=False)
class Job:
    run: Callable[["Job"], Any]  # runs on the worker thread; its return value resolves `future`
    kind: str  # "comfy" | "a1111" | "control"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    number: float = 0
    entry: list | None = None  # ComfyUI's 5-tuple for /queue
    on_cancel: Callable[["Job", str], None] | None = None
    future: Future = field(default_factory=Future)
    interrupt: threading.Event = field(default_factory=threading.Event)
    # live progress, read by /progress and the web page
    step: int = 0
    steps: int = 0
    preview: Callable[[], Any] | None = None  # decodes the latest estimate on demand
    started: float | None = None

    def cancel(self, reason: str) -> None:
        if self.on_cancel is not None:
            self.on_cancel(self, reason)
        if not self.future.done():
            self.future.set_exception(Cancelled(reason))


class Worker:
    def __init__(self, max_queue: int = 100, on_change: Callable[[], None] = lambda: None):
        self.max_queue = max_queue
        self.on_change = on_change  # queue length changed (websocket status broadcasts)
        self.running: Job | None = None
        self._heap: list[tuple[float, int, Job]] = []
        self._counter = itertools.count(1)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="chromaflow-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # queue ---------------------------------------------------------------------------------------------------
    def submit(self, job: Job, front: bool = False, number: float | None = None) -> Job:
        with self._cv:
            if self._closed:
                raise Rejected("the server is shutting down and takes no new jobs")
            if len(self._heap) >= self.max_queue:
                raise Rejected(f"the queue is full ({self.max_queue} jobs pending, --max-queue); retry later")
            order = next(self._counter)
            job.number = float(number) if number is not None else (-order if front else order)
            heapq.heappush(self._heap, (job.number, order, job))
            self._cv.notify()
        self.on_change()
        return job

    def pending(self) -> list[Job]:
        with self._cv:
            return [job for _, _, job in sorted(self._heap, key=lambda e: e[:2])]

    def remaining(self) -> int:
        with self._cv:
            return len(self._heap) + (self.running is not None)

    def cancel(self, ids: set[str] | None = None, reason: str = "deleted from the queue") -> list[Job]:
        """Remove pending jobs (all with ids=None). A running job is not touched: interrupt it instead."""
        with self._cv:
            gone = [e for e in self._heap if ids is None or e[2].id in ids]
            self._heap = [e for e in self._heap if e not in gone]
            heapq.heapify(self._heap)
        for _, _, job in gone:
            job.cancel(reason)
        if gone:
            self.on_change()
        return [job for _, _, job in gone]

    def interrupt(self, job_id: str | None = None) -> bool:
        job = self.running
        if job is not None and (job_id is None or job.id == job_id):
            job.interrupt.set()
            return True
        return False

    # the thread ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                job = heapq.heappop(self._heap)[2]
                self.running = job
            job.started = time.time()
            try:
                result = job.run(job)
            except BaseException as e:  # noqa: BLE001 - the job's outcome, reported to whoever waits on it
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._cv:
                    self.running = None
                self.on_change()

    def shutdown(self, grace: float = 30.0) -> list[Job]:
        """Stop taking jobs, cancel the pending ones, let the running one finish (interrupted after `grace` s)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        cancelled = self.cancel(reason="cancelled: the server shut down before the job ran")
        self._thread.join(grace)
        if self._thread.is_alive():
            self.interrupt()
            self._thread.join(grace)
        return cancelled
