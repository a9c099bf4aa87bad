"""The eNTK of a PyTorch Lightning module as it trains, logged by ``NTKProbe``.

A LightningModule with a small MLP learns a Fashion-MNIST subset; the
:class:`ntklens.integrations.lightning.NTKProbe` callback probes its kernel on a fixed probe
set at log-spaced steps and logs ``probe/<key>`` through the trainer's loggers (here a
CSVLogger; TensorBoard or W&B loggers work the same way). Needs ``pip install
'ntklens[lightning]'``.

    python examples/lightning_probe.py --out lightning_logs
    python examples/lightning_probe.py --n-train 256 --steps 30 --out /tmp/logs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntklens.data import load_dataset, nested_subset_indices, preprocess, probe_indices
from ntklens.integrations.lightning import NTKProbe


class Classifier(pl.LightningModule):
    """An MLP trained with SGD on cross-entropy."""

    def __init__(self, in_features: int, width: int, n_classes: int, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, n_classes),
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-probe", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("lightning_logs"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[NTKProbe, Path]:
    """Fit with the callback; return it and the CSV file its metrics were logged to."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    data = preprocess(load_dataset("fashion-mnist", path=args.data_path), flatten=True)
    train = torch.from_numpy(nested_subset_indices(data.y_train, args.n_train, args.seed))
    probe_rows = torch.from_numpy(probe_indices(data.y_test, args.n_probe, args.seed))
    loader = DataLoader(
        TensorDataset(data.x_train[train], data.y_train[train]),
        batch_size=args.batch_size,
        shuffle=True,
    )
    module = Classifier(data.x_train.shape[1], args.width, data.n_classes, args.lr)
    callback = NTKProbe(data.x_test[probe_rows], data.y_test[probe_rows], loss_fn=F.cross_entropy)
    logger = CSVLogger(args.out, name="ntk_probe")
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert callback.probe is not None
    shown = ["step", "ntk_trace", "ntk_alignment", "ntk_change", "chi_pos"]
    print(callback.probe.history[shown].to_string(index=False, float_format="{:.4g}".format))
    return callback, Path(logger.log_dir) / "metrics.csv"


if __name__ == "__main__":
    main()
