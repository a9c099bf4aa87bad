"""The ``ntklens`` command line: thin commands over the library.

Every command turns its options into one library call and prints the result. A user error
(:class:`~ntklens.errors.NtkLensError`, e.g. a bad config) prints ``error: <one line>`` to
stderr and exits with code 2, for every command of :data:`app` (see :class:`_Commands`);
usage errors also exit with 2, and ``sweep`` exits with 1 if any run failed. Warnings (a
damaged run left out of a store, say) print as ``warning: <one line>``. Imports of the
heavy parts happen inside the commands, so ``--help`` stays fast. To add a command, write
``@app.command()`` on a function that calls the library.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ntklens.errors import NtkLensError

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    typer.echo(f"warning: {_one_line(message)}", err=True)


_SWEEPING_COMMANDS = ("sweep", "reproduce")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


class _Commands(TyperGroup):
    """The command group: user errors become one line on stderr and exit code 2, warnings
    one line each; SIGTERM is handled as Ctrl-C (one line, exit code 130), so that a
    terminated sweep stops its workers and leaves its finished runs stored."""

    def invoke(self, ctx: typer.Context) -> Any:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except NtkLensError as error:
                typer.echo(f"error: {_one_line(error)}", err=True)
                raise typer.Exit(EXIT_USAGE) from None
            except KeyboardInterrupt:
                resumable = ctx.invoked_subcommand in _SWEEPING_COMMANDS
                typer.echo(
                    "interrupted: finished runs are stored; run the same command to resume"
                    if resumable
                    else "interrupted",
                    err=True,
                )
                raise typer.Exit(EXIT_INTERRUPTED) from None
            finally:
                signal.signal(signal.SIGTERM, previous)


app = typer.Typer(
    cls=_Commands,
    name="ntklens",
    help="Neural scaling laws through the empirical neural tangent kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ExecutorKind(enum.StrEnum):
    local = "local"
    ray = "ray"


class QueryFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class KernelOutput(enum.StrEnum):
    trace = "trace"
    full = "full"


class Split(enum.StrEnum):
    train = "train"
    test = "test"


ConfigArgument = Annotated[
    Path, typer.Argument(help="Study config (TOML), e.g. examples/width_scaling.toml.")
]
StoreArgument = Annotated[Path, typer.Argument(help="Results store directory.")]
DownloadOption = Annotated[
    bool,
    typer.Option(
        "--download/--no-download",
        help="Fetch a missing dataset (MNIST, Fashion-MNIST, CIFAR-10) into the user cache, "
        "checked by SHA-256.",
    ),
]


@app.command()
def sweep(
    config: ConfigArgument,
    store: Annotated[
        Path | None,
        typer.Option(help="Results store directory (default: results/<study name>)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Local worker processes (default: all cores)."),
    ] = None,
    executor: Annotated[
        ExecutorKind, typer.Option(help="Run locally in processes, or as Ray tasks.")
    ] = ExecutorKind.local,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (e.g. auto); default: start Ray locally."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun runs already in the store.")] = False,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed/--keep-failed", help="Rerun runs stored as failed, or not."),
    ] = True,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log lines instead of a live display.")
    ] = False,
    download: DownloadOption = False,
) -> None:
    """Run every run of a study not yet in the store; rerun to resume a stopped sweep."""
    from ntklens.sweep.config import load_config

    study = load_config(config)
    from ntklens.sweep import make_progress, run_sweep  # heavy: only for a valid config
    from ntklens.sweep.planning import check_runs, plan

    if executor is ExecutorKind.local or address is None:  # runs on this machine
        check_runs(plan(study), label=config.name)
    store = store or Path("results") / study.name
    summary = run_sweep(
        study,
        store,
        executor=executor.value,
        workers=workers,
        address=address,
        force=force,
        retry_failed=retry_failed,
        progress=make_progress(quiet=quiet),
        download=download,
    )
    typer.echo(
        f"{study.name}: {summary.n_total} runs, {summary.n_skipped} already stored, "
        f"{summary.n_ok} ok, {summary.n_failed} failed; store: {store}"
    )
    if summary.n_failed:
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command("plan")
def plan_command(
    config: ConfigArgument,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Workers to estimate the wall time for."),
    ] = None,
) -> None:
    """List the runs of a study with a cost and wall-time estimate, without running anything;
    refuse what every run would fail on (memory estimated from shapes, the device)."""
    from rich.console import Console
    from rich.table import Table

    from ntklens.sweep.config import load_config

    study = load_config(config)
    from ntklens.sweep.planning import check_runs, estimate_wall_time, plan, plan_table

    specs = plan(study)
    check_runs(specs, label=config.name)
    table = plan_table(specs)
    view = Table(title=f"{study.name}: {len(table)} runs", title_justify="left")
    for column in ("run_id", "param", "width", "n_train", "lr", "seed", "steps", "est. GFLOP"):
        view.add_column(column, justify="left" if column in ("run_id", "param") else "right")
    for row in table.itertuples(index=False):
        view.add_row(
            row.run_id,
            row.parameterization,
            str(row.width),
            str(row.n_train),
            f"{row.lr:.4g}",
            str(row.seed),
            str(row.steps),
            f"{row.gflop:,.1f}",
        )
    console = Console(width=max(100, Console().width))
    console.print(view)
    console.print(
        f"total: {len(table)} runs, {table['steps'].sum()} steps, "
        f"~{table['gflop'].sum():.4g} GFLOP (rough; training + probes + kernel baselines)",
        highlight=False,
    )
    wall = estimate_wall_time(specs, workers=workers)
    console.print(
        f"estimated wall time: ~{_duration(wall.seconds)} with {wall.workers} local worker(s) "
        f"({wall.fixed_s:.1f} s fixed cost per run + ~{wall.gflops:.0f} GFLOP/s per worker; "
        "rough, for an idle machine)",
        highlight=False,
    )


@app.command()
def status(
    store: StoreArgument,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Also count the study's runs not yet stored."),
    ] = None,
) -> None:
    """Summarize a store: runs ok and failed (with reasons), and what is left of a study."""
    from ntklens.store import open as open_store

    opened = open_store(store)
    runs = opened.runs()
    n_ok = int((runs["status"] == "ok").sum())
    failed = runs[runs["status"] == "failed"]
    damaged = opened.damaged()
    left_out = f", {len(damaged)} damaged left out" if damaged else ""
    typer.echo(f"{store}: {len(runs)} runs stored, {n_ok} ok, {len(failed)} failed{left_out}")
    for row in failed.itertuples(index=False):
        typer.echo(f"  failed {row.run_id} width={row.width} n_train={row.n_train}: {row.error}")
    if config is not None:
        from ntklens.sweep.config import load_config

        study = load_config(config)
        from ntklens.sweep.planning import plan

        planned = {spec.run_id for spec in plan(study)}
        stored_ok = set(runs.loc[runs["status"] == "ok", "run_id"])
        typer.echo(
            f"{study.name}: {len(planned)} planned, {len(planned & stored_ok)} done, "
            f"{len(planned - stored_ok)} to do"
        )


@app.command()
def query(
    store: StoreArgument,
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views runs, records, spectra.")],
    output_format: Annotated[
        QueryFormat, typer.Option("--format", "-f", help="How to print the result.")
    ] = QueryFormat.table,
) -> None:
    """Run SQL over a store, e.g. "SELECT width, avg(value) FROM records JOIN runs USING
    (run_id) WHERE quantity = 'test_loss' AND step = (SELECT max(step) FROM records r WHERE
    r.run_id = records.run_id) GROUP BY width" (the final test loss: records hold every probe
    step, and a stopping rule may end a run before its step cap)."""
    import pandas as pd

    from ntklens.store import open as open_store

    result = open_store(store).query(sql)
    if output_format is QueryFormat.csv:
        typer.echo(result.to_csv(index=False), nl=False)
    elif output_format is QueryFormat.json:
        typer.echo(result.to_json(orient="records", date_format="iso"))
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None):
            typer.echo(result.to_string(index=False))


class Method(enum.StrEnum):
    auto = "auto"
    jacobian = "jacobian"
    vector_products = "vector-products"
    layerwise = "layerwise"


class NtkFormat(enum.StrEnum):
    table = "table"
    json = "json"


@app.command()
def ntk(
    model_file: Annotated[
        Path,
        typer.Argument(
            help="A whole model saved with torch.save(model, path). It is loaded with "
            "torch.load(weights_only=False), which runs code from the file: only load "
            "files you trust. Its class must be importable here."
        ),
    ],
    dataset: Annotated[str, typer.Option(help="Dataset name, e.g. fashion-mnist, digits.")],
    data_path: Annotated[
        Path | None, typer.Option(help="Directory holding the dataset's files.")
    ] = None,
    download: DownloadOption = False,
    n: Annotated[int, typer.Option("--n", min=2, help="Number of probe points.")] = 256,
    split: Annotated[Split, typer.Option(help="Split to draw the probe points from.")] = (
        Split.test
    ),
    seed: Annotated[int, typer.Option(min=0, help="Seed of the class-balanced probe set.")] = 0,
    output: Annotated[
        KernelOutput,
        typer.Option(help="trace: N×N summed over outputs; full: (N·K)×(N·K)."),
    ] = KernelOutput.trace,
    method: Annotated[
        Method, typer.Option(help="eNTK method; auto picks by estimated time and memory.")
    ] = Method.auto,
    memory_budget: Annotated[
        str, typer.Option(help="Peak memory the kernel may use, e.g. 512MiB or 4GiB.")
    ] = "2GiB",
    device: Annotated[str, typer.Option(help="Where to compute: cpu, cuda, cuda:N, mps.")] = (
        "cpu"
    ),
    standardize: Annotated[
        bool,
        typer.Option(
            help="Standardize inputs with the dataset's train statistics, as ntklens runs do: "
            "give it for models ntklens trained. Off by default: the model sees the raw "
            "inputs in [0, 1]."
        ),
    ] = False,
    flatten: Annotated[
        bool, typer.Option(help="Feed flat vectors (N, C·H·W) instead of images (N, C, H, W).")
    ] = False,
    output_format: Annotated[
        NtkFormat, typer.Option("--format", "-f", help="table: name/value lines; json.")
    ] = NtkFormat.table,
    out: Annotated[
        Path | None, typer.Option(help="Save the kernel as a .npy file (flattened if full).")
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            help="Compute nothing: list each trainable tensor with the rule that covers it "
            "and each method's estimated time and memory."
        ),
    ] = False,
) -> None:
    """The eNTK of a saved model on a probe set of a dataset, and its observables."""
    import json

    if explain:
        _explain_saved_model(
            model_file,
            ProbeOptions(dataset, data_path, download, n, split.value, seed, standardize, flatten),
            KernelOptions(output.value, method.value, memory_budget, device),
            as_json=output_format is NtkFormat.json,
        )
        return
    if out is not None:
        from ntklens.store import check_writable

        check_writable(out.parent, "--out")
    options = KernelOptions(output.value, method.value, memory_budget, device)
    probe = ProbeOptions(dataset, data_path, download, n, split.value, seed, standardize, flatten)
    kernel, observables = _saved_model_kernel(model_file, probe, options)
    if out is not None:
        import numpy as np

        np.save(out, kernel.numpy())
    if output_format is NtkFormat.json:
        document = {
            "model": str(model_file),
            "dataset": dataset,
            "split": split.value,
            "n": n,
            "seed": seed,
            "output": output.value,
            "method": method.value,
            "standardize": standardize,
            "kernel_shape": list(kernel.shape),
            "observables": observables,
            "saved_to": str(out) if out is not None else None,
        }
        typer.echo(json.dumps(document, indent=2))
        return
    width = max(len(name) for name in observables)
    for name, value in observables.items():
        typer.echo(f"{name:<{width}}  {value:.6g}")
    if out is not None:
        typer.echo(f"kernel {tuple(kernel.shape)} saved to {out}")


class ReportFormat(enum.StrEnum):
    html = "html"
    json = "json"


class Scale(enum.StrEnum):
    quick = "quick"
    paper = "paper"
    full = "full"


LlmWidthsOption = Annotated[
    list[int] | None,
    typer.Option(
        "--llm-width",
        min=1,
        help="A typical LLM hidden size to compare w* with (repeatable; default 4096, 12288).",
    ),
]
FractionOption = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Threshold fraction of the descriptive w* estimators."),
]
MarginOption = Annotated[
    float,
    typer.Option(min=0.0, help="Equivalence margin of exponents in the verdicts (TOST)."),
]


def _analysis_options(
    llm_widths: list[int] | None, fraction: float, margin: float
) -> dict[str, Any]:
    """The analysis options of report/reproduce (only those given, so defaults stay there)."""
    options: dict[str, Any] = {"fraction": fraction, "margin": margin}
    if llm_widths:
        options["llm_widths"] = tuple(llm_widths)
    return options


@app.command()
def report(
    store: StoreArgument,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: <store>/report).")
    ] = None,
    output_format: Annotated[
        ReportFormat,
        typer.Option("--format", "-f", help="html: page + PNG/PDF figures; json: numbers only."),
    ] = ReportFormat.html,
    llm_widths: LlmWidthsOption = None,
    fraction: FractionOption = 0.5,
    margin: MarginOption = 0.05,
) -> None:
    """Fit scaling laws and the transition width over a store, and write the report."""
    from ntklens.report import build_report
    from ntklens.store import check_writable
    from ntklens.store import open as open_store

    opened = open_store(store)
    out = out or store / "report"
    check_writable(out, "--out")
    result = build_report(
        opened, out, fmt=output_format.value, **_analysis_options(llm_widths, fraction, margin)
    )
    if output_format is ReportFormat.json:
        typer.echo(result.paths[0].read_text(encoding="utf-8"))
        return
    for path in result.paths:
        typer.echo(f"wrote {path}")
    from ntklens.reproduce import verdict_lines

    typer.echo("\n".join(verdict_lines(result.summary)))
    for figure, reason in result.skipped.items():
        typer.echo(f"figure {figure} not drawn: {reason}")


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Argument(help="Dataset with a protocol: fashion-mnist.")],
    scale: Annotated[
        Scale,
        typer.Option(help="quick: ~15 min on 2 CPU cores; paper: ~2 h on 2 cores; full: GPU/Ray."),
    ] = Scale.quick,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: results/<dataset>-<scale>).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Local worker processes (default: all cores)."),
    ] = None,
    executor: Annotated[
        ExecutorKind, typer.Option(help="Run locally in processes, or as Ray tasks.")
    ] = ExecutorKind.local,
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Also print the headline as JSON.")
    ] = ReportFormat.html,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log lines instead of a live display.")
    ] = False,
    with_variants: Annotated[
        bool,
        typer.Option("--variants", help="Also re-derive the verdicts under the protocol variants."),
    ] = False,
    llm_widths: LlmWidthsOption = None,
    fraction: FractionOption = 0.5,
    margin: MarginOption = 0.05,
    download: DownloadOption = False,
) -> None:
    """Reproduce the paper's findings: data- and width-scaling sweeps, then the report."""
    import json

    from ntklens.reproduce import protocol

    studies = protocol(dataset, scale.value)  # validate before importing the heavy parts
    if with_variants:
        from ntklens.reproduce import variants

        variants(dataset, scale.value)
    if download:
        from ntklens.sweep.driver import check_data_available
        from ntklens.sweep.planning import plan

        for study in studies:
            check_data_available(plan(study), download=True)
    from ntklens.reproduce import reproduce as run_reproduction
    from ntklens.store import check_writable

    out = out or Path("results") / f"{dataset}-{scale.value}"
    check_writable(out, "--out")
    result = run_reproduction(
        dataset,
        scale.value,
        out,
        executor=executor.value,
        workers=workers,
        address=address,
        quiet=quiet,
        with_variants=with_variants,
        **_analysis_options(llm_widths, fraction, margin),
    )
    as_json = output_format is ReportFormat.json
    if as_json:
        typer.echo(json.dumps(result.headline, indent=2))
    else:
        from ntklens.reproduce import verdict_lines

        typer.echo("\n".join(verdict_lines(json.loads(result.summary_json.read_text()))))
    typer.echo(
        f"report: {result.report}\nsummary: {result.summary_json}\nstore: {result.store}"
        + (f"\nvariants: {result.variants_json}" if result.variants_json else ""),
        err=as_json,
    )
    if any(sweep.n_failed for sweep in result.sweeps.values()):
        raise typer.Exit(EXIT_RUN_FAILED)


def _duration(seconds: float) -> str:
    """``42 s``, ``12 min`` or ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How ``ntk`` computes the kernel."""

    output: str
    method: str
    memory_budget: str
    device: str

    def arguments(self) -> dict[str, str]:
        """The keyword arguments that ``ntk`` and ``explain`` share."""
        return {"output": self.output, "method": self.method, "memory_budget": self.memory_budget}


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """Which probe set ``ntk`` feeds the model, and how."""

    dataset: str
    data_path: Path | None
    download: bool
    n: int
    split: str
    seed: int
    standardize: bool
    flatten: bool


def _load_model(model_file: Path, device: Any) -> Any:
    """The nn.Module in ``model_file``; each way it can fail is one line naming it."""
    import pickle

    import torch

    if not model_file.is_file():
        raise NtkLensError(f"{model_file}: no such model file; save one with torch.save(model)")
    try:
        model = torch.load(model_file, weights_only=False, map_location=device)
    except ModuleNotFoundError as error:
        raise NtkLensError(
            f"{model_file}: the model's class is defined in module {error.name!r}, which "
            "cannot be imported here; put it on PYTHONPATH (or run from its directory)"
        ) from None
    except (AttributeError, pickle.UnpicklingError) as error:
        reason = _one_line(error)
        if "Can't get attribute" not in reason:
            raise NtkLensError(
                f"{model_file}: cannot load ({reason}); save the whole model with torch.save"
            ) from None
        raise NtkLensError(
            f"{model_file}: the model's class cannot be found ({reason}); define or import "
            "that class where it is looked up (a class saved from a script's __main__ must "
            "be importable under that name)"
        ) from None
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NtkLensError(
            f"{model_file}: cannot load ({reason}); save the whole model with torch.save"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise NtkLensError(
            f"{model_file}: holds a {type(model).__name__}, not a model; save the "
            "nn.Module itself with torch.save(model, path)"
        )
    return model


def _torch_device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise NtkLensError(
            f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise NtkLensError(f"--device {name!r} is not available (this machine has {have})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise NtkLensError(f"--device {name!r} is not available here; use cpu")
    return device


def _first_output(model: Any, x: Any) -> tuple[Any, str | None]:
    """The model's output on ``x`` (one example), or None and why it failed."""
    import torch

    try:
        with torch.no_grad():
            return model.eval()(x), None
    except Exception as error:
        return None, (str(error).strip().splitlines() or [type(error).__name__])[0]


def _saved_model_inputs(
    model_file: Path, probe: ProbeOptions, options: KernelOptions
) -> tuple[Any, Any, Any, int]:
    """Load the model and the probe set and check that they fit: (model, x, labels, K)."""
    import torch

    from ntklens.data import load_dataset, preprocess, probe_indices

    device = _torch_device(options.device)
    model = _load_model(model_file, device)
    data = load_dataset(probe.dataset, path=probe.data_path, download=probe.download)
    if probe.standardize:
        data = preprocess(data, standardize=True)
    x_all, y_all = (
        (data.x_train, data.y_train) if probe.split == "train" else (data.x_test, data.y_test)
    )
    index = torch.from_numpy(probe_indices(y_all, probe.n, probe.seed))
    dtype = next(model.parameters()).dtype
    x, labels = x_all[index].to(device=device, dtype=dtype), y_all[index]
    flat = x.reshape(len(x), -1)
    outputs, reason = _first_output(model, (flat if probe.flatten else x)[:1])
    if outputs is None:
        shape, features = tuple(x.shape[1:]), flat.shape[1]
        if not probe.flatten and _first_output(model, flat[:1])[0] is not None:
            raise NtkLensError(
                f"{model_file}: the model takes flat vectors of {features} features, not "
                f"{probe.dataset} images of shape {shape}; pass --flatten"
            )
        given = f"flat vectors of {features} features" if probe.flatten else f"images {shape}"
        raise NtkLensError(
            f"{model_file}: the model does not take {probe.dataset} inputs ({given}: {reason}); "
            "give the dataset it was trained on"
        )
    if outputs.shape[-1] != data.n_classes:
        raise NtkLensError(
            f"{model_file}: the model has {outputs.shape[-1]} outputs but {probe.dataset} has "
            f"{data.n_classes} classes; give the dataset it was trained on"
        )
    return model, flat if probe.flatten else x, labels, data.n_classes


def _explain_saved_model(
    model_file: Path, probe: ProbeOptions, options: KernelOptions, *, as_json: bool
) -> None:
    """Print what ``ntk`` would do on the saved model and probe set, without doing it."""
    import json

    from ntklens.kernel import explain

    model, inputs, _, _ = _saved_model_inputs(model_file, probe, options)
    explanation = explain(model, inputs, **options.arguments())
    if as_json:
        typer.echo(json.dumps(explanation.to_dict(), indent=2, default=str))
    else:
        typer.echo(str(explanation))


def _saved_model_kernel(
    model_file: Path, probe: ProbeOptions, options: KernelOptions
) -> tuple[Any, dict[str, float]]:
    """The kernel of a saved model on the probe set, and its observables."""
    import torch

    from ntklens.kernel import flatten
    from ntklens.kernel import ntk as entk
    from ntklens.observables import kernel_observables
    from ntklens.train.probes import kernel_targets

    model, inputs, labels, n_classes = _saved_model_inputs(model_file, probe, options)
    kernel = entk(model, inputs, **options.arguments())
    one_hot = torch.nn.functional.one_hot(labels, n_classes).to(torch.float64)
    observables = kernel_observables(kernel.cpu(), targets=kernel_targets(one_hot, options.output))
    result = flatten(kernel) if options.output == "full" else kernel
    return result.detach().cpu(), observables
