"""Sweep speed: the per-run fixed cost of a small run inside a sweep, and the wall time of N
CPU-bound runs with 2 local workers vs. 1.

Fixed cost: ``--fixed-runs`` Fashion-MNIST runs (width 16, 200 steps, n_train 256, kernel
baselines on) through ``run_sweep`` with one worker on one thread; the wall time per run,
against the target of 3 s, minus what the same run computes (the run's own wall time in
this process, warm, less its data loading) is the per-run fixed cost: worker start and
imports, data loading and standardization, store writes.

Speed-up: each run trains an MLP on the synthetic teacher task (no file I/O) with real
probes, through the same driver, executor and store as ``ntklens sweep``. Both sweeps run in
this process, one after the other, into fresh stores; the result is the ratio of their wall times
(target: 2 workers ≤ 0.65 × 1 worker). Each worker runs torch on one thread by default, so
the ratio measures the executor's parallelism; --threads-per-worker 0 uses the executor's
own split (cores // workers), which gives the single worker every core.

    python benchmarks/sweep_speed.py [--only fixed-cost|speed-up] [--runs 8] [--steps 1000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

from ntklens.schema import RunSpec
from ntklens.sweep import LocalExecutor, run_sweep
from ntklens.sweep.executors import available_cores
from ntklens.sweep.progress import LogProgress, SweepProgress

FIXED_COST_TARGET_S = 3.0


def fixed_cost_specs(runs: int, steps: int = 200) -> list[RunSpec]:
    """Small Fashion-MNIST runs that differ only in their seed."""
    return [
        RunSpec(
            dataset="fashion-mnist",
            n_train=256,
            n_test=500,
            n_probe=20,
            width=16,
            depth=2,
            batch_size=64,
            steps=steps,
            probe_points_per_decade=1,
            spectral_position_batch=64,
            seed=seed,
        )
        for seed in range(runs)
    ]


def in_process_costs(spec: RunSpec, repeats: int = 3) -> tuple[float, float]:
    """(whole run, its data loading) in seconds, in this process, warm, on one thread; the
    fastest of ``repeats`` (other load only ever adds time)."""
    import torch
    from threadpoolctl import threadpool_limits

    from ntklens.train.run import load_run_data, run

    def seconds(job: object) -> float:
        started = time.perf_counter()
        job(spec)  # type: ignore[operator]
        return time.perf_counter() - started

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        run(spec)  # warm: imports, caches
        data = min(seconds(load_run_data) for _ in range(repeats))
        whole = min(seconds(run) for _ in range(repeats))
    return whole, data


def fixed_cost(runs: int) -> None:
    """Print the wall time per run of a small sweep and the per-run fixed cost."""
    specs = fixed_cost_specs(runs)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = timed_sweep(specs, workers=1, threads=1, quiet=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / runs
    per_run = total / runs
    whole, data = in_process_costs(specs[0])
    compute = whole - data
    verdict = "meets" if per_run <= FIXED_COST_TARGET_S else "misses"
    print(
        f"fixed cost: {runs} runs (width 16, 200 steps, fashion-mnist) in {total:.1f} s with "
        f"1 worker: {per_run:.2f} s per run ({verdict} the ≤ {FIXED_COST_TARGET_S:g} s target)",
        flush=True,
    )
    print(
        f"  in this process, warm: the run takes {whole:.2f} s, of which data loading "
        f"{data:.2f} s; per-run fixed cost in the sweep: {per_run - compute:.2f} s "
        f"(wall per run − the run's compute, {compute:.2f} s)",
        flush=True,
    )
    print(
        f"  worker CPU time per run (user + system, pool start included): {cpu:.2f} s; "
        "unlike wall times, it hardly grows when other jobs share the cores",
        flush=True,
    )


def benchmark_specs(runs: int, steps: int, width: int) -> list[RunSpec]:
    """``runs`` equal-cost runs that differ only in their seed."""
    return [
        RunSpec(
            dataset="teacher",
            teacher_input_dim=32,
            n_train=2000,
            n_test=500,
            n_probe=20,
            width=width,
            depth=2,
            batch_size=128,
            steps=steps,
            lr=0.05,
            probe_points_per_decade=0,
            spectral_position_batch=64,
            seed=seed,
        )
        for seed in range(runs)
    ]


def timed_sweep(specs: list[RunSpec], workers: int, threads: int | None, quiet: bool) -> float:
    """Seconds for the whole sweep, pool start-up and store writes included."""
    executor = LocalExecutor(workers, threads_per_worker=threads)
    with tempfile.TemporaryDirectory() as store:
        started = time.perf_counter()
        summary = run_sweep(
            specs,
            Path(store),
            executor=executor,
            progress=SweepProgress() if quiet else LogProgress(),
        )
        elapsed = time.perf_counter() - started
    if summary.n_ok != len(specs):
        raise RuntimeError(f"{summary.n_failed} benchmark runs failed")
    return elapsed


def busy_loop(n: int) -> int:
    """Pure-Python work: what the machine's cores give two processes, without ntklens."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_ratio(n: int = 10_000_000) -> float:
    """Wall time of two busy loops in two processes over the same two loops in one: ~0.5 on
    two idle cores, ~1 when other load leaves no core free (then no executor can gain)."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(busy_loop, [1, 1])  # start both processes before timing
        started = time.perf_counter()
        pool.map(busy_loop, [n, n])
        parallel = time.perf_counter() - started
    started = time.perf_counter()
    busy_loop(n)
    busy_loop(n)
    return parallel / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("fixed-cost", "speed-up"), default=None)
    parser.add_argument("--fixed-runs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no per-run log lines")
    args = parser.parse_args()

    if args.only != "speed-up":
        fixed_cost(args.fixed_runs)
    if args.only == "fixed-cost":
        return
    specs = benchmark_specs(args.runs, args.steps, args.width)
    timings = {}
    for workers in (1, 2):
        threads = args.threads_per_worker or max(1, available_cores() // workers)
        timings[workers] = timed_sweep(specs, workers, args.threads_per_worker or None, args.quiet)
        print(
            f"{workers} worker(s) × {threads} thread(s): {args.runs} runs in "
            f"{timings[workers]:.1f} s",
            flush=True,
        )
    print(f"machine baseline: 2 busy processes / 1 = {machine_ratio():.3f}", flush=True)
    ratio = timings[2] / timings[1]
    verdict = "meets" if ratio <= 0.65 else "misses"
    print(f"wall time ratio 2 workers / 1 worker: {ratio:.3f} ({verdict} the ≤ 0.65 target)")


if __name__ == "__main__":
    main()
