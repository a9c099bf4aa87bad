"""Bad inputs to the kernel engine give one-line errors that name the argument."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import ntklens
from ntklens.errors import NtkLensError
from ntklens.kernel.products import ntk_matvec
from ntklens.kernel.tiling import parse_memory


class CountingModel(nn.Module):
    """A small MLP that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def raises_one_line(match: str, call: Callable, *args: object, **kwargs: object) -> NtkLensError:
    with pytest.raises(NtkLensError, match=match) as raised:
        call(*args, **kwargs)
    assert "\n" not in str(raised.value)
    return raised.value


@pytest.fixture
def model() -> CountingModel:
    torch.manual_seed(0)
    return CountingModel()


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": [1, 2]}, "model must be a torch.nn.Module"),
        ({"x1": [[1.0, 2.0]]}, "x1 must be a torch.Tensor"),
        ({"x1": torch.empty(0, 4)}, "x1 must have a non-empty batch"),
        ({"x2": torch.randn(3, 5)}, r"x2 has per-sample shape \(5,\) but x1 has \(4,\)"),
        ({"method": "magic"}, "unknown method 'magic'; choose one of 'auto', 'jacobian'"),
        ({"output": "diag"}, "unknown output 'diag'; choose one of 'full', 'trace'"),
        ({"memory_budget": "lots"}, "memory_budget 'lots' is not a size"),
        ({"memory_budget": -5}, "memory_budget must be positive"),
        ({"dtype": "float64"}, "dtype must be a floating-point torch.dtype"),
        ({"dtype": torch.int64}, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_bad_argument_is_named_before_any_work(
    model: CountingModel, kwargs: dict, match: str
) -> None:
    arguments = {"model": model, "x1": X} | kwargs
    raises_one_line(match, ntklens.ntk, arguments.pop("model"), arguments.pop("x1"), **arguments)
    assert model.calls == 0


def test_frozen_model_is_rejected(model: CountingModel) -> None:
    model.requires_grad_(False)
    raises_one_line("model has no trainable parameters", ntklens.ntk, model, X)


@pytest.mark.parametrize("method", ["auto", "jacobian", "vector-products", "layerwise"])
def test_budget_too_small_for_one_tile_names_the_minimum(model: CountingModel, method: str) -> None:
    error = raises_one_line(
        "memory_budget of 100B is too small",
        ntklens.ntk,
        model,
        X,
        method=method,
        memory_budget=100,
    )
    needed = str(error).split("needs at least ")[1].split(":")[0]
    kernel = ntklens.ntk(model, X, method=method, memory_budget=needed)
    assert kernel.shape == (6, 2, 6, 2)


def test_kernel_bigger_than_budget_is_refused(model: CountingModel) -> None:
    x = torch.randn(2000, 4)
    raises_one_line("memory_budget", ntklens.ntk, model, x, memory_budget="1MiB")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 2 kib ", 2048),
        ("2048", 2048),
        (1234, 1234),
    ],
)
def test_parse_memory(budget: int | str, expected: int) -> None:
    assert parse_memory(budget) == expected


def test_flatten_rejects_a_trace_kernel() -> None:
    raises_one_line("kernel must be a full kernel", ntklens.flatten, torch.zeros(3, 3))


def test_matvec_checks_its_vector(model: CountingModel) -> None:
    matvec = ntk_matvec(model, X)
    raises_one_line(r"v must be a tensor of shape \(6, 2\)", matvec, torch.zeros(6, 3))


class TupleModel(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.as_dict = as_dict

    def forward(self, x: Tensor) -> object:
        out = self.fc(x)
        return {"logits": out, "hidden": x} if self.as_dict else (out, x)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: ntklens.ntk(m, X.long()), r"x1 has dtype torch.int64 .*pass x1.float\(\)"),
        (lambda m: ntklens.ntk(m, X[:, 0]), r"x1 has shape \(6,\) .*x1.unsqueeze\(1\)"),
        (lambda m: ntk_matvec(m, X.long()), r"x has dtype torch.int64"),
        (lambda m: ntklens.ntk(m, X, output_fn="logits"), "output_fn must be a function"),
    ],
)
def test_careless_inputs_are_named(model: CountingModel, call: Callable, match: str) -> None:
    raises_one_line(match, call, model)


@pytest.mark.parametrize(
    ("as_dict", "match"),
    [
        (False, r"model returned a tuple of 2, not a tensor; pass output_fn=lambda out: out\[0\]"),
        (True, r"model returned a dict with keys \['logits', 'hidden'\].*out\['logits'\]"),
    ],
)
@pytest.mark.parametrize("method", ["auto", "jacobian", "vector-products", "layerwise"])
def test_non_tensor_output_asks_for_output_fn(as_dict: bool, match: str, method: str) -> None:
    raises_one_line(match, ntklens.ntk, TupleModel(as_dict), X, method=method)
    raises_one_line(match, ntk_matvec, TupleModel(as_dict), X)


def test_output_without_batch_dimension_first_is_refused() -> None:
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x).sum(0)

    raises_one_line("batch dimension first: pass output_fn=", ntklens.ntk, Summed(), X)


def test_calls_that_change_with_the_batch_size_stop_layerwise() -> None:
    class BatchDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            return self.b(h) if len(x) > 4 else h

    raises_one_line(
        "other calls on a batch of 6 than on the probe batches",
        ntklens.ntk,
        BatchDependent(),
        X,
        method="layerwise",
    )
