"""Executors: run many :class:`RunSpec` s in parallel and hand their results back to the driver.

An executor is a context manager; inside it, :meth:`Executor.results` yields one
:class:`RunResult` per spec in the order they finish. A run that raises becomes a failed
result carrying the exception's one-line message, so one bad run never stops a sweep.
Executors never write the store: the driver process does, one result at a time.

Every run sets its thread count (torch, BLAS, OpenMP) explicitly, because the thread count
can change the order of float sums; the same thread count gives the same records on either
executor, and on a worker's first run as on its later ones. A limit set with threadpoolctl
only reaches the libraries already loaded, so the libraries runs compute with (numpy,
scipy.linalg, torch and the training module) are imported first; a local worker also sets
the ``*_NUM_THREADS`` variables before it imports anything, for whatever loads later.

This module imports nothing heavy at its top, so that a spawned worker, which imports it
to run its initializer, sets those variables before numpy or torch are loaded.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ntklens.errors import ConfigError, NtkLensError

if TYPE_CHECKING:
    from ntklens.schema import RunResult, RunSpec

RunTask = Callable[["RunSpec"], "RunResult"]

#: environment variables that BLAS and OpenMP libraries read when they load
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
#: libraries with thread pools that runs compute with, loaded before any limit is set
RUN_LIBRARIES = ("numpy", "scipy.linalg", "torch")


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def train_task(spec: RunSpec) -> RunResult:
    """The default task: train and probe one run with :func:`ntklens.train.run.run`."""
    from ntklens.train.run import run

    return run(spec)


def task_modules(task: RunTask) -> tuple[str, ...]:
    """The modules to import before limiting threads: the run libraries and, for the default
    task, the training module, which imports all that a run uses (another task's module is
    imported already, when the task is unpickled)."""
    return (*RUN_LIBRARIES, "ntklens.train.run") if task is train_task else RUN_LIBRARIES


def import_modules(modules: Sequence[str]) -> None:
    """Import ``modules`` (a no-op for those already imported)."""
    for module in modules:
        importlib.import_module(module)


def execute_run(spec: RunSpec, task: RunTask, threads: int) -> RunResult:
    """Run ``task(spec)`` on ``threads`` threads; an exception becomes a failed result.

    The limit covers torch and the BLAS and OpenMP pools of numpy and scipy too: left at
    their default (every core), each worker's scipy solves would oversubscribe the cores
    that the other workers are using. Those libraries are imported before the limit is set,
    since it only reaches libraries already loaded.
    """
    start = time.perf_counter()
    try:
        import_modules(task_modules(task))
    except Exception as error:
        return failed_result(spec, one_line(error), time.perf_counter() - start)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            return task(spec)
    except Exception as error:
        return failed_result(spec, one_line(error), time.perf_counter() - start)


def failed_result(spec: RunSpec, reason: str, wall_time_s: float = 0.0) -> RunResult:
    """A failed :class:`RunResult` with no records, keeping the reason."""
    from ntklens.schema import RunResult

    return RunResult(
        spec=spec, run_id=spec.run_id, status="failed", error=reason, wall_time_s=wall_time_s
    )


def one_line(error: BaseException) -> str:
    """``"TypeName: first line of the message"``; user errors keep just their message."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if isinstance(error, NtkLensError):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Executor(AbstractContextManager["Executor"]):
    """Runs specs and yields results as they finish; use it as a context manager."""

    #: how many runs can be in flight at once (known once entered)
    slots: int = 1
    #: whether runs read files from this machine's disks (then the driver checks the data)
    local_files: bool = True

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(interrupted=exc_type is not None)

    def close(self, *, interrupted: bool = False) -> None:
        """Release what entering took; ``interrupted`` (leaving on an error) drops queued runs."""

    def results(self, specs: Sequence[RunSpec]) -> Iterator[RunResult]:
        """Yield one result per spec, in the order the runs finish."""
        raise NotImplementedError


_started_runs: Any = None  # in a local worker: where it announces each run it starts


#: how often a local worker checks that the sweep that started it is still there
PARENT_CHECK_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """End this worker once its parent is gone (killed outright, say) instead of running
    on as an orphan; its unfinished run is not stored, so a resumed sweep redoes it."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _init_worker(started_runs: Any, threads: int, modules: tuple[str, ...]) -> None:
    """Watch the parent, set the thread variables before anything is imported, then
    import what runs use (once per worker: its runs start warm) and cap the pools already
    loaded."""
    global _started_runs
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    import_modules(modules)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
    _started_runs = started_runs


def _execute_in_worker(spec: RunSpec, task: RunTask, threads: int) -> RunResult:
    _started_runs.put(spec.run_id)
    return execute_run(spec, task, threads)


class LocalExecutor(Executor):
    """A pool of ``workers`` spawned processes on this machine, the default executor.

    ``workers`` defaults to the available cores, and each worker runs torch and BLAS on
    ``threads_per_worker`` threads (default: cores // workers, at least 1). Even
    ``workers=1`` uses one worker process, so a run behaves the same whatever the count.
    Workers announce each run they start; if a worker process dies (killed, out of memory)
    the pool is rebuilt, the runs that were in a worker are charged an attempt and every
    unfinished run is resubmitted. A run charged ``max_attempts`` times is recorded failed.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        task: RunTask = train_task,
        max_attempts: int = 3,
    ) -> None:
        cores = available_cores()
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}; pass --workers 1")
        if threads_per_worker is not None and threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
        self.workers = workers or cores
        self.threads = threads_per_worker or max(1, cores // self.workers)
        self.slots = self.workers
        self.task = task
        self.max_attempts = max_attempts
        self._context = multiprocessing.get_context("spawn")
        self._started = self._context.SimpleQueue()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        self._pool = self._new_pool()
        return self

    def close(self, *, interrupted: bool = False) -> None:
        if self._pool is None:
            return
        # On an error (Ctrl-C, SIGTERM) drop queued runs and stop the running ones: their
        # results would have nowhere to go. ProcessPoolExecutor has no public way to end
        # its workers before Python 3.14 (terminate_workers), hence _processes.
        workers = (
            list((getattr(self._pool, "_processes", None) or {}).values()) if interrupted else []
        )
        self._pool.shutdown(wait=not interrupted, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=10)
        self._pool = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(self._started, self.threads, task_modules(self.task)),
        )

    def _drain_started(self, into: set[str]) -> None:
        while not self._started.empty():
            into.add(self._started.get())

    def results(self, specs: Sequence[RunSpec]) -> Iterator[RunResult]:
        if self._pool is None:
            raise RuntimeError("use LocalExecutor as a context manager: with LocalExecutor() as ex")
        queue = {spec.run_id: spec for spec in specs}  # unfinished runs
        attempts = dict.fromkeys(queue, 0)
        idle_breaks = 0
        while queue:
            futures: dict[Future[RunResult], str] = {
                self._pool.submit(_execute_in_worker, spec, self.task, self.threads): run_id
                for run_id, spec in queue.items()
            }
            in_worker: set[str] = set()
            broken = False
            outstanding = set(futures)
            while outstanding:
                done, outstanding = wait(outstanding, return_when=FIRST_COMPLETED)
                self._drain_started(in_worker)
                for future in done:
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    in_worker.discard(futures[future])
                    del queue[futures[future]]
                    yield result
            if not broken:
                return
            self._pool.shutdown(wait=True)
            self._drain_started(in_worker)
            lost = [run_id for run_id in queue if run_id in in_worker]
            idle_breaks = 0 if lost else idle_breaks + 1
            if idle_breaks >= self.max_attempts:
                raise RuntimeError(
                    "worker processes keep dying before they start a run; "
                    "check that `python -c 'import ntklens, torch'` works"
                )
            for run_id in lost:
                attempts[run_id] += 1
                if attempts[run_id] >= self.max_attempts:
                    yield failed_result(
                        queue.pop(run_id),
                        f"worker process died {self.max_attempts} times (killed or out of "
                        "memory); lower --workers or the size of this run",
                    )
            self._pool = self._new_pool()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray, which is not installed; pip install 'ntklens[ray]'"
        ) from None
    return ray


class RayExecutor(Executor):
    """Each run is a Ray task; the driver (this process) gathers results and writes the store.

    Connects to the cluster at ``address`` (e.g. ``"auto"`` or ``"ray://host:10001"``), or
    starts a local Ray instance when ``address`` is None; an already initialized Ray is used
    as it is. Each task asks for ``threads_per_task`` CPUs and runs torch and BLAS on that many
    threads. A task whose worker is lost is retried up to ``max_retries`` times by Ray.
    Every node needs ntklens installed and the dataset readable.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        threads_per_task: int = 1,
        task: RunTask = train_task,
        max_retries: int = 3,
    ) -> None:
        if threads_per_task < 1:
            raise ConfigError(f"threads_per_task must be at least 1, got {threads_per_task}")
        self.address = address
        self.local_files = address is None
        self.threads = threads_per_task
        self.task = task
        self.max_retries = max_retries
        self._ray: Any = None
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                options = {} if self.address else {"include_dashboard": False}
                ray.init(address=self.address, **options)
            except ConnectionError as error:
                raise ConfigError(
                    f"--address {self.address}: cannot reach a Ray cluster ({one_line(error)}); "
                    "check the address or start one with `ray start --head`"
                ) from None
            self._started_ray = True
        self._ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = max(1, cpus // self.threads)
        return self

    def close(self, *, interrupted: bool = False) -> None:
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
        self._ray = None

    def results(self, specs: Sequence[RunSpec]) -> Iterator[RunResult]:
        ray = self._ray
        if ray is None:
            raise RuntimeError("use RayExecutor as a context manager: with RayExecutor() as ex")
        remote = ray.remote(num_cpus=self.threads, max_retries=self.max_retries)(execute_run)
        refs = {remote.remote(spec, self.task, self.threads): spec for spec in specs}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as error:
                        result = failed_result(refs[ref], f"ray: {one_line(error)}")
                    yield result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def make_executor(kind: str, *, workers: int | None = None, address: str | None = None) -> Executor:
    """The executor named on the command line: "local" (default) or "ray"."""
    if kind == "local":
        if address is not None:
            raise ConfigError("--address only applies to --executor ray; drop it or add that")
        return LocalExecutor(workers)
    if kind == "ray":
        if workers is not None:
            raise ConfigError(
                "--workers only applies to --executor local; Ray uses the cluster's CPUs"
            )
        return RayExecutor(address)
    raise ConfigError(f"--executor {kind!r} is unknown; use 'local' or 'ray'")
