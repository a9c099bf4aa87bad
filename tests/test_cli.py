"""The command line: help, plan, status, query, ntk and exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import ntklens.store
from ntklens.cli import app
from ntklens.data import load_dataset, preprocess, probe_indices
from ntklens.models import build_model
from ntklens.schema import RunResult, RunSpec, Spectrum
from ntklens.sweep import load_config, plan

runner = CliRunner()

STUDY = """
name = "cli-study"
[data]
dataset = "digits"
n_test = 100
[probe]
n = 20
[train]
steps = 10
[sweep]
widths = [8, 16]
n_train = [50]
seeds = [0, 1, 2]
"""


@pytest.fixture
def study(tmp_path: Path) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent(STUDY))
    return path


@pytest.fixture
def store(tmp_path: Path, study: Path) -> Path:
    """Two of the study's runs stored ok and one other run failed, written by hand."""
    path = tmp_path / "store"
    results = ntklens.store.open(path, create=True)
    planned = {(s.width, s.seed): s for s in plan(load_config(study))}
    failed = RunSpec(dataset="digits", n_train=50, width=32, steps=10)
    with results.writer():
        for spec, status in ((planned[8, 0], "ok"), (planned[16, 0], "ok"), (failed, "failed")):
            width = spec.width
            records = pd.DataFrame(
                {"step": [0, 10], "quantity": ["test_loss"] * 2, "value": [2.5, 1.0 / width]}
            )
            results.write(
                RunResult(
                    spec=spec,
                    run_id=spec.run_id,
                    status=status,
                    records=records,
                    spectra=[Spectrum(0, "entk", np.array([2.0, 1.0]))],
                    error="run diverged at step 3; lower lr" if status == "failed" else None,
                    failed_step=3 if status == "failed" else None,
                )
            )
    return path


@pytest.mark.parametrize(
    "command",
    [[], ["sweep"], ["plan"], ["status"], ["query"], ["ntk"], ["report"], ["reproduce"]],
)
def test_help_everywhere(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    text = " ".join(result.stdout.split())
    if command == ["sweep"]:
        for option in ("--store", "--workers", "--executor", "--address", "--force", "--quiet"):
            assert option in result.stdout
    if command == ["ntk"]:
        assert "weights_only=False" in text
        for option in ("--method", "--memory-budget", "--device", "--format", "--flatten"):
            assert option in result.stdout
        assert "--standardize" in text and "Off by default" in text
    if command in (["ntk"], ["sweep"], ["reproduce"]):
        assert "--download" in result.stdout


def test_plan_lists_every_run_and_totals(study: Path) -> None:
    result = runner.invoke(app, ["plan", str(study)])
    assert result.exit_code == 0, result.output
    for spec in plan(load_config(study)):
        assert spec.run_id in result.stdout
    assert "total: 6 runs, 60 steps" in result.stdout
    assert "estimated wall time: ~" in result.stdout


def test_status_counts_and_explains_failures(store: Path, study: Path) -> None:
    result = runner.invoke(app, ["status", str(store)])
    assert result.exit_code == 0
    assert "3 runs stored, 2 ok, 1 failed" in result.stdout
    assert "width=32 n_train=50: run diverged at step 3; lower lr" in result.stdout
    with_plan = runner.invoke(app, ["status", str(store), "--config", str(study)])
    assert "cli-study: 6 planned, 2 done, 4 to do" in with_plan.stdout


def test_query_prints_what_the_store_returns(store: Path) -> None:
    sql = (
        "SELECT width, value FROM records JOIN runs USING (run_id) "
        "WHERE step = 10 AND status = 'ok' ORDER BY width"
    )
    expected = ntklens.store.open(store).query(sql)
    assert list(expected["value"]) == [1 / 8, 1 / 16]

    as_csv = runner.invoke(app, ["query", str(store), sql, "--format", "csv"])
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(as_csv.stdout)), expected)
    as_json = runner.invoke(app, ["query", str(store), sql, "-f", "json"])
    assert json.loads(as_json.stdout) == expected.to_dict(orient="records")
    as_table = runner.invoke(app, ["query", str(store), sql])
    assert as_table.stdout.split() == ["width", "value", "8", "0.1250", "16", "0.0625"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["query", "{store}", "SELEC 1"], "error: query: Parser Error"),
        (["query", "{missing}", "SELECT 1"], "no such store"),
        (["status", "{missing}"], "no such store"),
        (["sweep", "{study}", "--executor", "ray", "--workers", "2"], "--workers only applies"),
        (["sweep", "{study}", "--address", "auto"], "--address only applies"),
        (["ntk", "{missing}", "--dataset", "digits"], "no such model file"),
        (["ntk", "{study}", "--dataset", "digits"], "cannot load"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    arguments: list[str], message: str, store: Path, study: Path, tmp_path: Path
) -> None:
    paths = {"store": store, "study": study, "missing": tmp_path / "missing"}
    result = runner.invoke(app, [a.format(**paths) for a in arguments])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(study: Path) -> None:
    assert runner.invoke(app, ["sweep", str(study), "--executor", "slurm"]).exit_code == 2
    assert runner.invoke(app, ["sweep", str(study), "--workers", "0"]).exit_code == 2
    assert runner.invoke(app, ["plan"]).exit_code == 2


def explicit_trace_kernel(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ_a J_a J_aᵀ from the full Jacobian of the stacked outputs: the eNTK by definition."""
    params = dict(model.named_parameters())

    def outputs(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(params, values, strict=True)), (x,))

    jacobians = torch.autograd.functional.jacobian(outputs, tuple(params.values()))
    flat = torch.cat([j.reshape(*j.shape[:2], -1) for j in jacobians], dim=2)  # (N, K, P)
    return torch.einsum("iap,jap->ij", flat, flat)


def test_ntk_of_a_saved_model_matches_the_explicit_jacobian(tmp_path: Path) -> None:
    model = build_model("mlp", width=12, depth=2, in_shape=(1, 8, 8), n_outputs=10, seed=4)
    model = model.double()
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "kernel.npy"
    result = runner.invoke(
        app,
        [
            *("ntk", str(tmp_path / "model.pt"), "--dataset", "digits", "--n", "20"),
            *("--standardize", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output

    data = preprocess(load_dataset("digits"), standardize=True)
    index = torch.from_numpy(probe_indices(data.y_test, 20, 0))
    expected = explicit_trace_kernel(model.eval(), data.x_test[index].double())
    np.testing.assert_allclose(np.load(out), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    printed = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
    assert float(printed["trace"]) == pytest.approx(float(expected.trace()), rel=1e-5)
    assert {"entropy", "effective_rank", "alignment"} <= set(printed)


def test_ntk_rejects_a_model_for_other_data(tmp_path: Path) -> None:
    model = build_model("mlp", width=8, depth=1, in_shape=(16,), n_outputs=4)
    torch.save(model, tmp_path / "teacher.pt")
    result = runner.invoke(app, ["ntk", str(tmp_path / "teacher.pt"), "--dataset", "digits"])
    assert result.exit_code == 2
    assert "does not take digits inputs" in result.stderr
    torch.save({"not": "a model"}, tmp_path / "dict.pt")
    result = runner.invoke(app, ["ntk", str(tmp_path / "dict.pt"), "--dataset", "digits"])
    assert result.exit_code == 2 and "holds a dict, not a model" in result.stderr


@pytest.mark.slow
def test_sweep_exits_1_when_a_run_fails_and_keeps_the_failure(tmp_path: Path) -> None:
    config = tmp_path / "diverge.toml"
    config.write_text(
        textwrap.dedent(STUDY)
        .replace("steps = 10", "steps = 10\nlr = 1e12")
        .replace("widths = [8, 16]", "widths = [8]")
        .replace("seeds = [0, 1, 2]", "seeds = [0]")
    )
    store = tmp_path / "store"
    result = runner.invoke(app, ["sweep", str(config), "--store", str(store), "-w", "1", "-q"])
    assert result.exit_code == 1, result.output
    assert "0 ok, 1 failed" in result.stdout
    runs = ntklens.store.open(store).runs()
    assert list(runs["status"]) == ["failed"]
    assert runs["error"].item().startswith(f"run {runs['run_id'].item()}: ")
    assert runs["failed_step"].item() >= 0


def damage(store: Path) -> dict[str, Path]:
    """Truncate one ok run's records and overwrite another's spectra; their directories."""
    runs = ntklens.store.open(store).runs().set_index("width")
    truncated = store / "runs" / runs.loc[8, "run_id"]
    overwritten = store / "runs" / runs.loc[16, "run_id"]
    records = truncated / "records.parquet"
    records.write_bytes(records.read_bytes()[:50])
    spectra = overwritten / "spectra.parquet"
    spectra.write_bytes(bytes(spectra.stat().st_size))
    return {"truncated": truncated, "overwritten": overwritten}


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize(
    "command",
    [
        ["status", "{store}"],
        ["query", "{store}", "SELECT count(*) AS n FROM runs"],
        ["report", "{store}", "--format", "json", "--out", "{out}"],
    ],
)
def test_commands_on_a_damaged_store_warn_naming_each_damaged_run(
    command: list[str], store: Path, tmp_path: Path
) -> None:
    damaged = damage(store)
    arguments = [a.format(store=store, out=tmp_path / "report") for a in command]
    result = runner.invoke(app, arguments)
    warnings = warning_lines(result.stderr)
    assert "Traceback" not in result.output
    assert len(warnings) == 2, result.stderr
    for path in damaged.values():
        assert sum(str(path) in line for line in warnings) == 1
    if command[0] == "status":
        assert result.exit_code == 0
        assert "1 runs stored, 0 ok, 1 failed, 2 damaged left out" in result.stdout
    elif command[0] == "query":
        assert result.exit_code == 0 and result.stdout.split() == ["n", "1"]
    else:  # only the failed run is left: one line, the report's own reason
        assert result.exit_code == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "none of the 1 runs finished" in errors[0]


def read_only_runner(store: Path) -> list[str]:
    """A command prefix that runs with ``store`` read-only: a read-only bind mount in a
    private mount namespace for root (whom permissions do not stop), else no write bits."""
    if os.geteuid() != 0:
        for path in (store, *store.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    prefix = ["unshare", "--mount", "sh", "-c", script, str(store)]
    probe = subprocess.run([*prefix, "touch", str(store / "probe")], capture_output=True)
    if probe.returncode == 0 or b"Read-only" not in probe.stderr:
        pytest.skip("cannot make a read-only mount here (needs unshare and mount)")
    return prefix


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (["status", "{store}"], None),
        (["query", "{store}", "SELECT count(*) AS n FROM runs"], None),
        (["report", "{store}", "--format", "json"], "cannot write there"),
        (["report", "{store}", "--format", "json", "--out", "{out}"], None),
        (["sweep", "{study}", "--store", "{store}", "-q"], "cannot write there"),
    ],
)
def test_a_read_only_store_reads_and_refuses_writes_in_one_line(
    command: list[str], error: str | None, store: Path, study: Path, tmp_path: Path
) -> None:
    prefix = read_only_runner(store)
    arguments = [a.format(store=store, study=study, out=tmp_path / "out") for a in command]
    completed = subprocess.run(
        [*prefix, sys.executable, "-m", "ntklens", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    if error is None:
        assert completed.returncode == 0, completed.stderr
        if command[0] == "report":
            assert json.loads(completed.stdout) == json.loads(
                (tmp_path / "out" / "summary.json").read_text()
            )
    else:
        assert completed.returncode == 2
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and error in lines[0] and str(store) in lines[0], lines


def saved_digits_model(tmp_path: Path, **options: object) -> tuple[torch.nn.Module, Path]:
    model = build_model("mlp", width=12, depth=2, in_shape=(1, 8, 8), n_outputs=10, seed=4)
    model = model.double()
    torch.save(model, tmp_path / "model.pt")
    return model, tmp_path / "model.pt"


def test_ntk_uses_raw_inputs_unless_asked_and_reports_json(tmp_path: Path) -> None:
    model, path = saved_digits_model(tmp_path)
    out = tmp_path / "kernel.npy"
    arguments = ["ntk", str(path), "--dataset", "digits", "--n", "20", "--out", str(out)]
    result = runner.invoke(app, [*arguments, "--method", "jacobian", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = load_dataset("digits")  # not standardized
    index = torch.from_numpy(probe_indices(data.y_test, 20, 0))
    expected = explicit_trace_kernel(model.eval(), data.x_test[index].double())
    np.testing.assert_allclose(np.load(out), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    document = json.loads(result.stdout)
    assert document["method"] == "jacobian" and document["standardize"] is False
    assert document["kernel_shape"] == [20, 20]
    assert document["observables"]["trace"] == pytest.approx(float(expected.trace()), rel=1e-9)
    budgeted = runner.invoke(
        app, [*arguments[:6], "--method", "layerwise", "--memory-budget", "1MiB", "-f", "json"]
    )
    assert budgeted.exit_code == 0, budgeted.output
    assert json.loads(budgeted.stdout)["observables"]["trace"] == pytest.approx(
        float(expected.trace()), rel=1e-9
    )


def test_ntk_names_the_flatten_problem_and_flatten_fixes_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    ).double()
    torch.save(model, tmp_path / "flat.pt")
    arguments = ["ntk", str(tmp_path / "flat.pt"), "--dataset", "digits", "--n", "10"]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2
    assert "takes flat vectors of 64 features, not digits images of shape (1, 8, 8)" in (
        refused.stderr
    )
    assert "pass --flatten" in refused.stderr
    flat = runner.invoke(app, [*arguments, "--flatten", "-f", "json"])
    assert flat.exit_code == 0, flat.output
    data = load_dataset("digits")
    index = torch.from_numpy(probe_indices(data.y_test, 10, 0))
    expected = explicit_trace_kernel(model.eval(), data.x_test[index].double().reshape(10, -1))
    trace = json.loads(flat.stdout)["observables"]["trace"]
    assert trace == pytest.approx(float(expected.trace()), rel=1e-9)


def test_ntk_names_a_class_that_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "lab_models.py"
    module.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layer = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.layer(x.flatten(1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import lab_models

    torch.save(lab_models.Net(), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "lab_models")
    module.unlink()
    result = runner.invoke(app, ["ntk", str(tmp_path / "net.pt"), "--dataset", "digits"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "module 'lab_models'" in line and "cannot be imported" in line


def test_ntk_refuses_an_unavailable_device(tmp_path: Path) -> None:
    _, path = saved_digits_model(tmp_path)
    result = runner.invoke(app, ["ntk", str(path), "--dataset", "digits", "--device", "cuda:9"])
    assert result.exit_code == 2 and "--device 'cuda:9' is not available" in result.stderr


def test_ntk_explain_lists_every_trainable_tensor_and_computes_nothing(tmp_path: Path) -> None:
    model, path = saved_digits_model(tmp_path)
    out = tmp_path / "kernel.npy"
    arguments = ["ntk", str(path), "--dataset", "digits", "--n", "20", "--explain"]
    result = runner.invoke(app, [*arguments, "--out", str(out), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    document = json.loads(result.stdout)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert {p["name"]: p["numel"] for p in document["parameters"]} == trainable
    assert document["choice"] in {m["method"] for m in document["methods"]}
    table = runner.invoke(app, arguments)
    assert table.exit_code == 0, table.output
    assert all(name in table.stdout for name in trainable)
