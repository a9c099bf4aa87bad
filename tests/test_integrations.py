"""Tests of the optional integrations (a logging hook for any sink, the Lightning callback)
and of the examples that use a Probe in a user's own loop."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntklens.errors import NtkLensError
from ntklens.integrations.logging import ProbeLogger, log_values
from ntklens.train.probes import Probe, probe_steps

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed in /usr/share/datasets",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return model, x, y


def test_probe_logger_sends_scheduled_probes_to_a_dict_sink() -> None:
    model, x, y = small_problem()
    logged: list[tuple[dict[str, float], int]] = []
    hook = ProbeLogger(
        Probe(model, x[:8], y[:8], loss_fn=F.cross_entropy),
        lambda metrics, step: logged.append((metrics, step)),
        schedule=probe_steps(9, 2),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    returned = []
    for step in range(10):
        returned.append(hook(step, batch=(x, y)))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert [step for _, step in logged] == probe_steps(9, 2)
    assert [r is not None for r in returned] == [s in probe_steps(9, 2) for s in range(10)]
    history = hook.probe.history.set_index("step")
    for metrics, step in logged:
        assert all(key.startswith("probe/") for key in metrics)
        assert {key.removeprefix("probe/") for key in metrics} == set(history.columns)
        for key, value in metrics.items():
            assert value == history.loc[step, key.removeprefix("probe/")]


def test_scalar_sink_gets_one_call_per_quantity() -> None:
    calls: list[tuple[str, float, int]] = []
    log_values({"a": 1.0, "b": 2.0}, 7, lambda *args: calls.append(args), kind="scalar", prefix="")
    assert calls == [("a", 1.0, 7), ("b", 2.0, 7)]
    model, x, _ = small_problem()
    hook = ProbeLogger(
        Probe(model, x[:6], spectral_position=False), lambda *a: calls.append(a), kind="scalar"
    )
    values = hook(0)
    assert values is not None
    assert [c[0] for c in calls[2:]] == [f"probe/{key}" for key in values]
    assert all(c[2] == 0 for c in calls[2:])


def test_probe_logger_rejects_bad_arguments() -> None:
    model, x, _ = small_problem()
    probe = Probe(model, x[:6], spectral_position=False)
    for arguments, words in (
        ({"probe": model, "sink": print}, "Probe("),
        ({"probe": probe, "sink": "wandb"}, "callable"),
        ({"probe": probe, "sink": print, "kind": "table"}, "kind"),
    ):
        with pytest.raises(NtkLensError, match=words.replace("(", r"\(")):
            ProbeLogger(**arguments)


# --- Lightning ---------------------------------------------------------------------------


def test_lightning_callback_logs_the_probe_keys_through_the_loggers() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    from ntklens.integrations.lightning import NTKProbe

    class MemoryLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.metrics: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.metrics.append((step, dict(metrics)))

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    net, x, y = small_problem()
    module = Module(net)
    initial = copy.deepcopy(module)
    callback = NTKProbe(x[:8], y[:8], loss_fn=F.cross_entropy, per_decade=2)
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_steps=12,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    trainer.fit(module, loader)
    probed = [(step, m) for step, m in logger.metrics if any(k.startswith("probe/") for k in m)]
    assert [step for step, _ in probed] == probe_steps(12, 2)
    expected = Probe(initial, x[:8], y[:8])(0, batch=(x[:8], y[:8]), loss_fn=F.cross_entropy)
    assert set(probed[0][1]) == {f"probe/{key}" for key in expected}
    for key, value in expected.items():  # step 0: the untrained module on the first batch
        assert probed[0][1][f"probe/{key}"] == pytest.approx(value, rel=1e-10), key
    assert probed[-1][1]["probe/ntk_change"] > 0
    assert list(callback.probe.history["step"]) == probe_steps(12, 2)


def test_lightning_callback_needs_a_loss_for_the_spectral_position() -> None:
    pytest.importorskip("lightning.pytorch")
    from ntklens.integrations.lightning import NTKProbe

    with pytest.raises(NtkLensError, match="loss_fn"):
        NTKProbe(torch.zeros(4, 3))
    NTKProbe(torch.zeros(4, 3), spectral_position=False)


def test_lightning_module_says_how_to_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "ntklens.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ntklens\[lightning\]'") as caught:
        importlib.import_module("ntklens.integrations.lightning")
    assert "\n" not in str(caught.value)


# --- examples ------------------------------------------------------------------------------


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fashion
def test_own_training_loop_example_runs_and_writes_its_history(tmp_path: Path, capsys) -> None:
    example = load_example("own_training_loop")
    out = tmp_path / "history.csv"
    argv = ["--n-train", "64", "--n-probe", "10", "--width", "16", "--steps", "12"]
    probe = example.main([*argv, "--batch-size", "16", "--per-decade", "2", "--out", str(out)])
    history = pd.read_csv(out)
    assert list(history["step"]) == probe_steps(12, 2)
    pd.testing.assert_frame_equal(history, probe.history, check_exact=False, rtol=1e-12)
    assert history["ntk_change"].iloc[0] == 0 and history["ntk_change"].iloc[-1] > 0
    assert "ntk_alignment" in capsys.readouterr().out


@needs_fashion
def test_lightning_example_logs_the_probe_keys(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    example = load_example("lightning_probe")
    argv = ["--n-train", "64", "--n-probe", "10", "--width", "16", "--steps", "10"]
    callback, metrics_file = example.main([*argv, "--batch-size", "16", "--out", str(tmp_path)])
    logged = pd.read_csv(metrics_file)
    keys = {f"probe/{key}" for key in callback.probe.history.columns if key != "step"}
    assert keys <= set(logged.columns)
    probed = logged.dropna(subset=["probe/ntk_trace"])
    assert list(probed["step"]) == probe_steps(10, 4)
