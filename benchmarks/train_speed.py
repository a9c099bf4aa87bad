"""Training speed of ``ntklens.train`` against a minimal hand-written torch loop.

Both loops train the same network (the run's own ``WidthModel``, rebuilt from the spec's
seed for every repetition) on the same training subset and mini-batches of the same size,
with SGD and momentum on cross-entropy:

* ``hand-written``: ``randperm`` → ``zero_grad`` → forward → loss → ``backward`` → ``step``,
  with one optimizer group for all parameters;
* ``ntklens``: :class:`ntklens.train.run.TrainingLoop` as :func:`ntklens.train.run` drives
  it, timed over ``advance(n_steps)`` only (probes off): per-layer lr groups, a finiteness
  check of every step's loss, the seeded batch order.

Repetitions alternate between the two in one process (ABBA order); the table shows median
steps per second and the overhead ``t_ntklens / t_hand − 1``. Then one full
:func:`~ntklens.train.run.run` under the default probe schedule (``probe_points_per_decade``,
``n_probe``, spectral position batch of :class:`RunSpec`, the default 500 steps) splits its
wall time into training, probes, kernel baselines and the rest (data, model, setup).

Last, the cost of one :class:`~ntklens.train.probes.Probe` call in a plain loop against one
training step of the same model and batch (medians, alternating in one process): the whole
probe (trace eNTK on ``n_probe`` points with every observable, plus the exact spectral
position on the batch), the kernel part alone and the spectral-position part alone.

    python benchmarks/train_speed.py                  # Fashion-MNIST, 784→512→512→10
    python benchmarks/train_speed.py --steps 100 --repeats 3 --width 256 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import ntklens.train.run as train_run
from ntklens.schema import RunSpec
from ntklens.train.probes import Probe, Prober
from ntklens.train.run import RunSetup, build_run_model, prepare, run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--skip-share", action="store_true", help="skip the probed run (the probes' share)"
    )
    parser.add_argument("--n-probe", type=int, default=RunSpec.model_fields["n_probe"].default)
    return parser.parse_args()


def bench_spec(args: argparse.Namespace, **overrides: Any) -> RunSpec:
    """The benchmark's run: SGD with momentum, cross-entropy, mini-batches."""
    fields: dict[str, Any] = {
        "dataset": args.dataset,
        "n_train": args.n_train,
        "width": args.width,
        "depth": args.depth,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": 0.05,
        "momentum": 0.9,
        "loss": "cross_entropy",
    }
    return RunSpec(**{**fields, **overrides})


def time_hand_written(setup: RunSetup, spec: RunSpec) -> float:
    """Seconds for ``n_steps`` steps of the minimal loop on a fresh copy of the run's model."""
    model = build_run_model(spec, setup.data)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    x, labels = setup.data.train.x, setup.data.train.labels
    generator = torch.Generator().manual_seed(spec.seed)
    batches: list[torch.Tensor] = []
    start = time.perf_counter()
    for _ in range(setup.n_steps):
        if not batches:
            batches = list(torch.randperm(len(x), generator=generator).split(spec.batch_size))
        index = batches.pop()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[index]), labels[index])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def time_ntklens(spec: RunSpec) -> float:
    """Seconds for ``n_steps`` steps of ntklens's training loop on a freshly prepared run."""
    setup = prepare(spec)
    start = time.perf_counter()
    setup.loop.advance(setup.n_steps)
    return time.perf_counter() - start


class Stopwatch:
    """Accumulates the time spent inside wrapped callables."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def probe_share(spec: RunSpec) -> dict[str, float]:
    """Wall-time split of one full run under the default probe schedule, in seconds."""
    training, probes, baselines = Stopwatch(), Stopwatch(), Stopwatch()
    patches = [
        (train_run.TrainingLoop, "advance", training),
        (Prober, "measure", probes),
        (train_run, "kernel0_baseline", baselines),
        (train_run, "infinite_baseline", baselines),
        (train_run, "infinite_probe", probes),
    ]
    originals = [getattr(owner, name) for owner, name, _ in patches]
    for owner, name, watch in patches:
        setattr(owner, name, watch.wrap(getattr(owner, name)))
    try:
        result = run(spec)
    finally:
        for (owner, name, _), original in zip(patches, originals, strict=True):
            setattr(owner, name, original)
    if result.status != "ok":
        raise RuntimeError(f"the probed run failed: {result.error}")
    total = result.wall_time_s
    return {
        "total": total,
        "training": training.seconds,
        "probes": probes.seconds,
        "baselines": baselines.seconds,
        "other": total - training.seconds - probes.seconds - baselines.seconds,
        "n_probes": float(result.records["step"].nunique()),
    }


def probe_cost(spec: RunSpec, n_probe: int, repeats: int) -> dict[str, float]:
    """Median seconds of one training step and of Probe calls, on the run's model and batch."""
    setup = prepare(spec)
    model = setup.model
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    x, labels = setup.data.train.x[: spec.batch_size], setup.data.train.labels[: spec.batch_size]
    probe_x = setup.data.probe_x[:n_probe]
    probes = {
        "probe": Probe(model, probe_x, setup.data.probe_labels[:n_probe]),
        "kernel only": Probe(model, probe_x, spectral_position=False),
        "spectral position only": Probe(model, probe_x, observables=()),
    }

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    calls: dict[str, Callable[[], Any]] = {"training step": step}
    for name, probe in probes.items():
        calls[name] = lambda p=probe: p(0, batch=(x, labels), loss_fn=F.cross_entropy)
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console()
    spec = bench_spec(args)
    setup = prepare(spec)
    console.print(
        f"{spec.dataset}: n_train={spec.n_train}, MLP {spec.depth}×{spec.width}, "
        f"batch {spec.batch_size}, {setup.n_steps} steps, torch threads "
        f"{torch.get_num_threads()}"
    )
    time_hand_written(setup, spec)  # warm-up of both paths
    time_ntklens(spec)
    hand, ours = [], []
    for repeat in range(args.repeats):  # ABBA order: neither loop always runs first
        if repeat % 2:
            ours.append(time_ntklens(spec))
            hand.append(time_hand_written(setup, spec))
        else:
            hand.append(time_hand_written(setup, spec))
            ours.append(time_ntklens(spec))
    hand_s, ours_s = statistics.median(hand), statistics.median(ours)
    table = Table(title=f"training without probes, median of {args.repeats}")
    for column in ("loop", "steps/s", "overhead"):
        table.add_column(column)
    table.add_row("hand-written", f"{setup.n_steps / hand_s:.1f}", "—")
    table.add_row("ntklens", f"{setup.n_steps / ours_s:.1f}", f"{ours_s / hand_s - 1:+.1%}")
    console.print(table)

    cost = probe_cost(spec, args.n_probe, args.repeats)
    table = Table(
        title=(
            f"one Probe call vs one training step (batch {spec.batch_size}, "
            f"{args.n_probe} probe points), median of {args.repeats}"
        )
    )
    for column in ("call", "ms", "× training step"):
        table.add_column(column)
    for name, seconds in cost.items():
        table.add_row(name, f"{1e3 * seconds:.1f}", f"{seconds / cost['training step']:.1f}")
    console.print(table)
    if args.skip_share:
        return

    default_run = bench_spec(args, steps=RunSpec.model_fields["steps"].default)
    share = probe_share(default_run)
    table = Table(
        title=(
            f"one run under the default probe schedule: {default_run.steps} steps, "
            f"{share['n_probes']:.0f} probes, {default_run.probe_points_per_decade} per decade"
        )
    )
    for column in ("part", "seconds", "share"):
        table.add_column(column)
    for part in ("training", "probes", "baselines", "other", "total"):
        table.add_row(part, f"{share[part]:.2f}", f"{share[part] / share['total']:.1%}")
    console.print(table)


if __name__ == "__main__":
    main()
