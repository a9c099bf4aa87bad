"""Watch the eNTK of your own model in your own training loop with ``Probe``.

A plain torch loop trains a small residual MLP (not one of ntklens's families) on a
Fashion-MNIST subset; a :class:`ntklens.train.probes.Probe` on a fixed, class-balanced probe
set measures the kernel's trace, entropy, effective rank, alignment with the labels, its
change since step 0 and the spectral position on the current batch at log-spaced steps.

    python examples/own_training_loop.py                       # 2,000 examples, 1,000 steps
    python examples/own_training_loop.py --n-train 256 --steps 50 --out history.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ntklens.data import load_dataset, nested_subset_indices, preprocess, probe_indices
from ntklens.train.probes import Probe, probe_steps

SHOWN = ("ntk_trace", "ntk_effective_rank", "ntk_alignment", "ntk_change", "chi_pos")


class ResidualMLP(nn.Module):
    """784 → width, two residual blocks, → 10."""

    def __init__(self, in_features: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(2)
        )
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-probe", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--per-decade", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the history as CSV")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Probe:
    """Train, probing on the log schedule; print the history and return the probe."""
    args = parse_args(argv)
    data = preprocess(load_dataset("fashion-mnist", path=args.data_path), flatten=True)
    train = torch.from_numpy(nested_subset_indices(data.y_train, args.n_train, args.seed))
    probe_rows = torch.from_numpy(probe_indices(data.y_test, args.n_probe, args.seed))
    x, y = data.x_train[train], data.y_train[train]

    torch.manual_seed(args.seed)
    model = ResidualMLP(x.shape[1], args.width, data.n_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    probe = Probe(model, data.x_test[probe_rows], data.y_test[probe_rows], loss_fn=F.cross_entropy)
    schedule = set(probe_steps(args.steps, args.per_decade))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=generator)
    for step in range(args.steps + 1):
        start = (step * args.batch_size) % len(x)
        index = order.roll(-start)[: args.batch_size]
        xb, yb = x[index], y[index]
        if step in schedule:  # the model after `step` updates, on the batch it trains on next
            probe(step, batch=(xb, yb))
        if step == args.steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()

    history = probe.history
    print(history[["step", *SHOWN]].to_string(index=False, float_format="{:.4g}".format))
    if args.out is not None:
        history.to_csv(args.out, index=False)
    return probe


if __name__ == "__main__":
    main()
