"""The public API: the lazy facade, studies from Python and the store's final table."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ntklens
from ntklens.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"

OWN_MODEL = """
from torch import nn
from ntklens.models import layers


def make_net(width, parameterization, n_classes, input_shape):
    p = {"width": width, "parameterization": parameterization}
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(
        nn.Flatten(), layers.Linear(d, width, kind="input", **p), nn.Tanh(),
        layers.readout(width, n_classes, **p),
    )
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        check=False,
        timeout=300,
    )


def test_import_ntklens_imports_no_torch_and_the_names_resolve() -> None:
    code = textwrap.dedent(
        """
        import sys
        import ntklens
        assert "torch" not in sys.modules, "import ntklens imported torch"
        ntklens.observables; ntklens.run_study; ntklens.open_store; ntklens.layers.Linear
        print("ok", "torch" in sys.modules)
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "True"]


def test_all_lists_every_group_and_every_name_resolves() -> None:
    grouped = [name for names in ntklens.API.values() for name in names]
    assert set(ntklens.__all__) == {*grouped, "__version__", "NtkLensError", "ConfigError",
                                    "DataError"}  # fmt: skip
    assert len(ntklens.__all__) == len(set(ntklens.__all__))
    assert set(ntklens.API) >= {"kernel", "observables", "models", "data", "probe", "studies",
                                "store", "analysis", "report"}  # fmt: skip
    for name in grouped:
        module_name, attribute = next(g[name] for g in ntklens.API.values() if name in g)
        module = importlib.import_module(module_name)
        if attribute is not None and not hasattr(module, attribute):
            continue  # provided by a part still being written (explain, Probe)
        expected = module if attribute is None else getattr(module, attribute)
        assert getattr(ntklens, name) is expected
    assert ntklens.__version__ == ntklens.schema.VERSION
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ntklens.nope  # noqa: B018


def test_probe_is_public_once_it_exists() -> None:
    probes = importlib.import_module("ntklens.train.probes")
    if not hasattr(probes, "Probe"):
        pytest.skip("ntklens.train.probes.Probe is not merged yet")
    assert ntklens.Probe is probes.Probe
    assert ntklens.probe_steps(100, 2) == probes.probe_steps(100, 2)


def _study(factory: object) -> dict:
    return {
        "name": "api-study",
        "data": {"dataset": "digits", "n_test": 60},
        "probe": {"n": 20, "points_per_decade": 1},
        "model": {"factory": factory},
        "train": {"steps": 3, "lr": 0.05},
        "sweep": {"widths": [8, 16], "n_train": [40], "parameterizations": ["standard", "mup"]},
    }


@pytest.fixture
def own_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "own_model_api.py").write_text(OWN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("own_model_api")
    yield module.make_net
    sys.modules.pop("own_model_api", None)


def test_plan_takes_a_path_a_dict_or_a_config(tmp_path: Path, own_model) -> None:
    from ntklens.sweep.config import validate_config

    as_dict = ntklens.plan(_study(own_model))
    text = json.dumps(_study("own_model_api:make_net"))
    toml = "\n".join(  # the same study as TOML
        ['name = "api-study"']
        + [
            f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
            for section, values in json.loads(text).items()
            if isinstance(values, dict)
        ]
    )
    (tmp_path / "study.toml").write_text(toml)
    as_path = ntklens.plan(tmp_path / "study.toml")
    as_config = ntklens.plan(validate_config(json.loads(text)))
    assert (
        [s.run_id for s in as_dict] == [s.run_id for s in as_path] == [s.run_id for s in as_config]
    )
    assert {s.model for s in as_dict} == {"own_model_api:make_net"}
    with pytest.raises(ConfigError, match="not importable by name"):
        ntklens.plan(_study(lambda width, n_classes, input_shape: None))
    with pytest.raises(ConfigError, match="TOML path, a dict or a StudyConfig"):
        ntklens.plan(42)


@pytest.mark.slow
def test_run_study_stores_factory_runs_and_final_is_their_last_values(
    tmp_path: Path, own_model
) -> None:
    store_path = tmp_path / "store"
    summary = ntklens.run_study(_study(own_model), store=store_path, workers=1)
    assert (summary.n_total, summary.n_ok, summary.n_failed) == (4, 4, 0)
    again = ntklens.run_study(_study(own_model), store=store_path, workers=1)
    assert again.n_skipped == 4  # resumed: nothing to do
    store = ntklens.open_store(store_path)
    final = store.final()
    assert len(final) == 4 and set(final["model"]) == {"own_model_api:make_net"}
    assert set(final["study"]) == {"api-study"}
    records = store.records()
    for quantity in ("test_loss", "ntk_trace"):
        last = records[records["quantity"] == quantity].sort_values("step").groupby("run_id")
        expected = last["value"].last()
        got = final.set_index("run_id")[quantity]
        assert got.loc[expected.index].tolist() == pytest.approx(expected.tolist(), rel=0, abs=0)
    assert (final["final_step"] == 3).all()
    report = ntklens.build_report(store_path, tmp_path / "report", fmt="json")
    families = set(report.summary.get("families", {}))
    assert families == {"own_model_api:make_net/standard", "own_model_api:make_net/mup"}
