"""Tests of the width families, their parameterizations and their parameter/FLOP counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.flop_counter import FlopCounterMode

from ntklens.errors import NtkLensError
from ntklens.models import build_model, count_flops, count_parameters

PARAMETERIZATIONS = ("standard", "ntk", "mup")


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _gaussian_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("activation", ["relu", "erf", "tanh", "gelu"])
def test_output_shapes(parameterization: str, activation: str) -> None:
    x = torch.rand(3, 2, 8, 8)
    for family in ("mlp", "cnn"):
        model = build_model(
            family,
            width=6,
            depth=2,
            in_shape=(2, 8, 8),
            n_outputs=5,
            parameterization=parameterization,
            activation=activation,
        )
        out = model(x)
        assert out.shape == (3, 5)
        assert torch.isfinite(out).all()
        assert (model.family, model.width, model.depth) == (family, 6, 2)
        assert (model.parameterization, model.activation) == (parameterization, activation)


def test_defaults_of_weight_and_bias_std() -> None:
    relu = build_model("mlp", width=4, depth=1, in_shape=(3,), n_outputs=2)
    erf = build_model("mlp", width=4, depth=1, in_shape=(3,), n_outputs=2, activation="erf")
    assert relu.weight_std == pytest.approx(math.sqrt(2.0))
    assert erf.weight_std == 1.0
    assert relu.bias_std == erf.bias_std == 0.1


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_mlp_parameter_count_matches_formula(parameterization: str) -> None:
    d, n, depth, k = 12, 7, 3, 4
    model = build_model(
        "mlp",
        width=n,
        depth=depth,
        in_shape=(3, 4),
        n_outputs=k,
        parameterization=parameterization,
    )
    expected = (d * n + n) + (depth - 1) * (n * n + n) + (n * k + k)
    assert count_parameters(model) == expected


def test_cnn_parameter_count_matches_formula() -> None:
    c, n, depth, k, side = 3, 5, 2, 4, 8
    model = build_model(
        "cnn", width=n, depth=depth, in_shape=(c, side, side), n_outputs=k, pooling="max"
    )
    final_side = side // 2**depth
    expected = (c * 9 * n + n) + (depth - 1) * (n * 9 * n + n) + (n * final_side**2 * k + k)
    assert count_parameters(model) == expected


def test_zero_bias_std_drops_the_bias_only_where_its_multiplier_vanishes() -> None:
    d, n, k = 6, 5, 3
    weights_only = d * n + n * n + n * k
    for parameterization in ("ntk", "mup"):
        model = build_model(
            "mlp",
            width=n,
            depth=2,
            in_shape=(d,),
            n_outputs=k,
            parameterization=parameterization,
            bias_std=0.0,
        )
        assert count_parameters(model) == weights_only
    standard = build_model("mlp", width=n, depth=2, in_shape=(d,), n_outputs=k, bias_std=0.0)
    biases = [layer.bias for layer in _weight_layers(standard)]
    assert count_parameters(standard) == weights_only + 2 * n + k
    assert all(torch.count_nonzero(b) == 0 for b in biases)


@pytest.mark.parametrize(
    ("family", "options"),
    [("mlp", {}), ("cnn", {}), ("cnn", {"pooling": "avg"}), ("cnn", {"padding": 0})],
)
@pytest.mark.parametrize("parameterization", ["standard", "mup"])
def test_flops_match_torch_flop_counter(family: str, options: dict, parameterization: str) -> None:
    in_shape = (2, 9, 9)
    model = build_model(
        family,
        width=4,
        depth=3,
        in_shape=in_shape,
        n_outputs=3,
        parameterization=parameterization,
        **options,
    )
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, *in_shape))
    assert count_flops(model, in_shape) == counter.get_total_flops()


def test_mlp_flops_match_formula() -> None:
    d, n, depth, k = 10, 6, 3, 2
    model = build_model("mlp", width=n, depth=depth, in_shape=(d,), n_outputs=k)
    assert count_flops(model, (d,)) == 2 * (d * n + (depth - 1) * n * n + n * k)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_same_seed_gives_identical_parameters_and_spares_the_global_rng(family: str) -> None:
    def make(seed: int) -> nn.Module:
        return build_model(
            family,
            width=5,
            depth=2,
            in_shape=(1, 6, 6),
            n_outputs=3,
            parameterization="mup",
            seed=seed,
        )

    rng_before = torch.get_rng_state()
    first, again, other = make(3), make(3), make(4)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])
    assert not torch.equal(_weight_layers(first)[0].weight, _weight_layers(other)[0].weight)


def test_parameters_are_plain() -> None:
    model = build_model(
        "cnn", width=4, depth=2, in_shape=(1, 6, 6), n_outputs=2, parameterization="mup"
    )
    for parameter in model.parameters():
        assert type(parameter) is nn.Parameter
        assert vars(parameter) == {}


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_vmap_jacrev_matches_per_example_backward(family: str, parameterization: str) -> None:
    """Per-example Jacobians from torch.func equal those from one backward pass per output."""
    model = build_model(
        family,
        width=4,
        depth=2,
        in_shape=(1, 5, 5),
        n_outputs=2,
        parameterization=parameterization,
        activation="tanh",
    ).double()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jacobians = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        for a in range(2):
            model.zero_grad()
            model(x[i : i + 1])[0, a].backward()
            for name, parameter in model.named_parameters():
                torch.testing.assert_close(jacobians[name][i, a], parameter.grad)


def test_forward_hooks_give_the_exact_ntk() -> None:
    """Hooks on the plain Linear modules alone rebuild the eNTK of an explicit Jacobian.

    For a Linear layer with input a_i and output gradient δ_i the per-layer kernel is
    (a_i·a_j + 1)(δ_i·δ_j); this only holds if the hooks see the modules' true inputs.
    """
    d, n = 5, 7
    model = build_model(
        "mlp",
        width=n,
        depth=2,
        in_shape=(d,),
        n_outputs=1,
        parameterization="ntk",
        activation="erf",
    ).double()
    x = _gaussian_inputs(6, d, seed=0)
    inputs: dict[nn.Module, torch.Tensor] = {}
    grads: dict[nn.Module, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        inputs[module] = args[0]
        output.register_hook(lambda grad: grads.__setitem__(module, grad))

    layers = _weight_layers(model)
    handles = [layer.register_forward_hook(capture) for layer in layers]
    model(x).sum().backward()
    for handle in handles:
        handle.remove()
    assert set(inputs) == set(grads) == set(layers)
    hooked = sum((inputs[m] @ inputs[m].T + 1) * (grads[m] @ grads[m].T) for m in layers)

    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).squeeze(1))(params)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
    torch.testing.assert_close(hooked, flat @ flat.T)


def _hand_forward(model: nn.Module, x: torch.Tensor, multipliers: list[tuple[float, float]]):
    """h = m_w · W x + m_b · b per layer, φ between layers, from the raw parameters."""
    phi = {"relu": torch.relu, "erf": torch.special.erf}[model.activation]
    layers = _weight_layers(model)
    h = x.flatten(1)
    for index, (layer, (m_w, m_b)) in enumerate(zip(layers, multipliers, strict=True)):
        h = m_w * h @ layer.weight.T + m_b * layer.bias
        if index < len(layers) - 1:
            h = phi(h)
    return h


@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_forward_equals_documented_formula(parameterization: str, activation: str) -> None:
    d, n, depth = 6, 9, 3
    sw, sb = 1.3, 0.4
    model = build_model(
        "mlp",
        width=n,
        depth=depth,
        in_shape=(2, 3),
        n_outputs=2,
        parameterization=parameterization,
        activation=activation,
        weight_std=sw,
        bias_std=sb,
    ).double()
    r = math.sqrt(n)
    multipliers = {
        "standard": [(1.0, 1.0)] * (depth + 1),
        "ntk": [(sw / math.sqrt(d), sb)] + [(sw / r, sb)] * depth,
        "mup": [(r * sw / math.sqrt(d), r * sb)] + [(1.0, r * sb)] * (depth - 1) + [(1 / r, sb)],
    }[parameterization]
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), _hand_forward(model, x, multipliers))


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_init_std_follows_the_parameterization(parameterization: str) -> None:
    d, n, k = 300, 400, 200
    sw, sb = 1.5, 0.5
    model = build_model(
        "mlp",
        width=n,
        depth=2,
        in_shape=(d,),
        n_outputs=k,
        parameterization=parameterization,
        weight_std=sw,
        bias_std=sb,
    )
    r = math.sqrt(n)
    expected = {
        "standard": [(sw / math.sqrt(d), sb), (sw / r, sb), (sw / r, sb)],
        "ntk": [(1.0, 1.0)] * 3,
        "mup": [(1 / r, 1 / r), (sw / r, 1 / r), (sw / r, 1.0)],
    }[parameterization]
    for layer, (weight_std, bias_std) in zip(_weight_layers(model), expected, strict=True):
        assert layer.weight.std().item() == pytest.approx(weight_std, rel=0.03)
        assert layer.bias.std().item() == pytest.approx(bias_std, rel=0.25)


@pytest.mark.parametrize(
    ("parameterization", "optimizer", "scales"),
    [
        ("standard", "sgd", lambda n: [1, 1, 1, 1, 1, 1]),
        ("standard", "adam", lambda n: [1, 1, 1, 1, 1, 1]),
        ("ntk", "sgd", lambda n: [1, 1, 1, 1, 1, 1]),
        ("mup", "sgd", lambda n: [1, 1, 1, 1, 1, 1]),
        # Adam μP (Tensor Programs V, Table 3) in the abc form: input weight and hidden
        # biases n^-1/2, hidden weight 1/n, output weight n^-1/2, output bias 1.
        ("mup", "adam", lambda n: [n**-0.5, n**-0.5, 1 / n, n**-0.5, n**-0.5, 1]),
    ],
)
def test_param_groups_lr_scales(parameterization: str, optimizer: str, scales) -> None:
    n, base_lr = 64, 0.3
    model = build_model(
        "mlp", width=n, depth=2, in_shape=(5,), n_outputs=2, parameterization=parameterization
    )
    groups = model.param_groups(base_lr, optimizer=optimizer)
    names = [name for name, _ in model.named_parameters()]
    assert [g["name"] for g in groups] == names
    assert [g["params"][0] for g in groups] == list(model.parameters())
    expected = [base_lr * s for s in scales(n)]
    assert [g["lr"] for g in groups] == pytest.approx(expected)
    torch.optim.SGD(groups).step()


def _hidden_update_rms(parameterization: str, optimizer: str, width: int, seed: int) -> float:
    """RMS change of the last hidden pre-activations after one optimizer step."""
    d, k = 16, 16
    x = _gaussian_inputs(32, d, seed=100 + seed)
    y = _gaussian_inputs(32, k, seed=200 + seed)
    model = build_model(
        "mlp",
        width=width,
        depth=2,
        in_shape=(d,),
        n_outputs=k,
        parameterization=parameterization,
        seed=seed,
    ).double()
    last_activation = [m for m in model.modules() if isinstance(m, nn.ReLU)][-1]
    captured: list[torch.Tensor] = []
    last_activation.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    opt_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = opt_class(model.param_groups(0.05, optimizer=optimizer))
    loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model(x)
    return (captured[1] - captured[0]).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    ("parameterization", "optimizer", "low", "high"),
    [("mup", "sgd", -0.15, 0.15), ("mup", "adam", -0.15, 0.15), ("ntk", "sgd", -0.75, -0.45)],
)
def test_mup_keeps_feature_updates_order_one(
    parameterization: str, optimizer: str, low: float, high: float
) -> None:
    """μP's defining property: one step moves hidden pre-activations by Θ(1) at any width;
    under the NTK parameterization the move shrinks like n^-1/2. At these widths the NTK
    slope is still pre-asymptotic: its local value goes -0.73, -0.59, -0.55 from 64 to 4096.
    """
    widths = [64, 256, 1024]
    rms = [
        np.mean([_hidden_update_rms(parameterization, optimizer, n, seed) for seed in range(6)])
        for n in widths
    ]
    slope = np.polyfit(np.log(widths), np.log(rms), 1)[0]
    assert low <= slope <= high


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"width": 0}, "width"),
        ({"width": -3}, "width"),
        ({"width": 2.5}, "width"),
        ({"depth": 0}, "depth"),
        ({"n_outputs": 0}, "n_outputs"),
        ({"family": "rnn"}, "family"),
        ({"parameterization": "ntp"}, "parameterization"),
        ({"activation": "sigmoid"}, "activation"),
        ({"weight_std": 0.0}, "weight_std"),
        ({"bias_std": -1.0}, "bias_std"),
        ({"in_shape": (0, 4, 4)}, "in_shape"),
        ({"family": "cnn", "in_shape": (16,)}, "in_shape"),
        ({"family": "cnn", "in_shape": (1, 4, 4), "pooling": "max", "depth": 3}, "in_shape"),
        ({"family": "cnn", "pooling": "sum"}, "pooling"),
        ({"family": "mlp", "pooling": "avg"}, "pooling"),
        ({"family": "cnn", "stride": 2}, "stride"),
    ],
)
def test_bad_arguments_raise_one_line_errors(arguments: dict, named: str) -> None:
    call = {"family": "mlp", "width": 4, "depth": 2, "in_shape": (1, 8, 8), "n_outputs": 2}
    call |= arguments
    family = call.pop("family")
    with pytest.raises(NtkLensError) as error:
        build_model(family, **call)
    message = str(error.value)
    assert named in message
    assert "\n" not in message


def test_param_groups_rejects_bad_arguments() -> None:
    model = build_model("mlp", width=4, depth=1, in_shape=(3,), n_outputs=2)
    with pytest.raises(NtkLensError, match="base_lr"):
        model.param_groups(0.0)
    with pytest.raises(NtkLensError, match="optimizer"):
        model.param_groups(0.1, optimizer="lbfgs")
