"""``ntklens.kernel.explain``: the rule per trainable tensor and each method's estimate."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

import ntklens
from ntklens.kernel import explain


class PartlyStructured(nn.Module):
    """A large weight used through torch.sin (unstructured) beside a LayerNorm MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Parameter(torch.randn(300, 20))
        self.fc = nn.Linear(20, 300)
        self.norm = nn.LayerNorm(300)
        self.head = nn.Linear(300, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.fc(x) + x @ torch.sin(self.odd).T))


def test_explain_names_every_tensor_its_rule_and_every_method() -> None:
    torch.manual_seed(0)
    model = PartlyStructured()
    result = explain(model, torch.randn(16, 20), output="trace")
    rules = {p.name: p.rule for p in result.parameters}
    assert set(rules) == {name for name, _ in model.named_parameters()}
    assert rules["odd"] == "fallback: used by torch.sin"
    assert rules["fc.weight"].startswith("linear [F.linear]")
    assert rules["fc.bias"] == "bias folded into fc.weight's Gram"
    assert rules["norm.weight"].startswith("scale [F.layer_norm]")
    expected_share = 1 - 6000 / sum(p.numel() for p in model.parameters())
    assert result.structured_share == pytest.approx(expected_share)
    assert [m.method for m in result.methods] == ["layerwise", "jacobian", "vector-products"]
    assert all(m.gflop is not None and m.gflop > 0 for m in result.methods)
    assert result.choice in {m.method for m in result.methods}
    text = str(result)
    assert "fallback: used by torch.sin" in text and "<- auto" in text
    data = result.to_dict()
    assert data["structured_share"] == pytest.approx(expected_share)
    assert len(data["parameters"]) == 7


def test_explain_strips_the_output_fn_wrapper_and_respects_the_budget() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(x), x

    result = explain(Pair(), torch.randn(8, 4), output_fn=lambda out: out[0], method="jacobian")
    assert [p.name for p in result.parameters] == ["fc.weight", "fc.bias"]
    assert [m.method for m in result.methods] == ["jacobian"]
    tight = explain(Pair(), torch.randn(8, 4), output_fn=lambda out: out[0], memory_budget=600)
    assert any(m.gflop is None for m in tight.methods)
    assert "over the budget" in str(tight)


def test_ntk_warns_when_fallbacks_carry_most_of_the_cost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ntklens.kernel.api"):
        ntklens.ntk(PartlyStructured(), torch.randn(32, 20), output="trace", method="layerwise")
    assert any("odd" in r.getMessage() and "explain" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ntklens.kernel.api"):
        mlp = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3))
        ntklens.ntk(mlp, torch.randn(32, 20), output="trace", method="layerwise")
    assert not caplog.records
