"""Supervised side tasks: a crash is logged with its traceback, restarted with backoff, and shown.

A worker's side tasks (the model watcher, the lag exporter, the trainer's
online-quality check) must not end silently: an unsupervised asyncio task that
raises just stops, and hot-swapping (say) with it. Here a crashed task is
marked not-ok in ``checks()`` (so ``/readyz`` fails), counted in
``rtrec_task_restarts_total``, restarted after a backoff, and marked ok again
once the restarted run has lasted ``recovered_s`` without crashing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

from rtrec.workers.metrics import TASK_RESTARTS

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 5.0  # how long stop() waits for cancelled side tasks to finish

TaskFactory = Callable[[], Coroutine[object, object, object]]


class Supervisor:
    """Runs side tasks for a worker until `stop()`."""

    def __init__(self, worker: str, max_backoff_s: float = 5.0, recovered_s: float = 5.0) -> None:
        self.worker = worker
        self.max_backoff_s = max_backoff_s
        self.recovered_s = recovered_s
        self.ok: dict[str, bool] = {}
        self.crashes: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    def supervise(self, name: str, factory: TaskFactory) -> asyncio.Task:
        """Run `factory()` until it returns; restart it whenever it raises."""
        self.ok[name] = True
        self.crashes.setdefault(name, 0)
        task = asyncio.create_task(self._run(name, factory), name=f"rtrec-{self.worker}-{name}")
        self._tasks.append(task)
        return task

    def checks(self) -> dict[str, bool]:
        return {f"task:{name}": ok for name, ok in self.ok.items()}

    async def stop(self) -> None:
        """Cancel every side task and wait for them, at most STOP_TIMEOUT_S: a task that swallowed its
        cancellation is named and left behind (the worker is stopping; it must not hang on one)."""
        self._stopped = True  # a task that swallowed its cancellation and then crashes is not restarted
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
            for task in pending:
                log.warning(
                    "%s: side task %s did not stop within %.0f s; leaving it",
                    self.worker,
                    task.get_name(),
                    STOP_TIMEOUT_S,
                )
        self._tasks.clear()

    async def _run(self, name: str, factory: TaskFactory) -> None:
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await factory()
                return  # finished on its own: nothing to restart
            except asyncio.CancelledError:
                raise
            except Exception:  # any crash: the task must come back, and say so meanwhile
                if self._stopped:
                    return
                self.ok[name] = False
                self.crashes[name] += 1
                TASK_RESTARTS.labels(worker=self.worker, task=name).inc()
                if time.monotonic() - started > self.recovered_s:
                    delay = 0.5  # it had been running fine: a fresh failure, not a crash loop
                log.exception("%s: side task %s crashed; restarting in %.1f s", self.worker, name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                asyncio.get_running_loop().call_later(self.recovered_s, self._mark_recovered, name, self.crashes[name])

    def _mark_recovered(self, name: str, crashes_then: int) -> None:
        """The restarted task ran `recovered_s` without crashing again."""
        if self.crashes.get(name) == crashes_then:
            self.ok[name] = True
