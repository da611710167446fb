"""Caffe's SGD update, poly policy and solver.prototxt reading, each against Caffe's formula written in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converter.errors import CaffeError
from segmentation.solver import CaffeSGD, SolverConfig, poly_rate, read_solver

MOMENTUM, DECAY = 0.9, 5e-4


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=generator)), torch.nn.Parameter(torch.randn(5, generator=generator))]


def _caffe_numpy(weights, grads_per_update, rates, *, mults, iter_size):
    """sgd_solver.cpp's ApplyUpdate per parameter: Normalize, Regularize, ComputeUpdateValue, Update."""
    weights = [w.copy() for w in weights]
    history = [np.zeros_like(w) for w in weights]
    for grads, rate in zip(grads_per_update, rates):
        for i, (w, (lr_mult, decay_mult)) in enumerate(zip(weights, mults)):
            diff = sum(g[i] for g in grads) * np.float32(1.0 / iter_size)
            diff = diff + DECAY * decay_mult * w
            history[i] = MOMENTUM * history[i] + rate * lr_mult * diff
            weights[i] = w - history[i]
    return weights


def _run_caffe_sgd(params, grads_per_update, rates, *, mults, iter_size):
    groups = [{"params": [p], "lr_mult": lr, "decay_mult": dm} for p, (lr, dm) in zip(params, mults)]
    optimizer = CaffeSGD(groups, momentum=MOMENTUM, weight_decay=DECAY, iter_size=iter_size)
    for grads, rate in zip(grads_per_update, rates):
        for grad in grads:  # iter_size backward passes accumulate
            for p, g in zip(params, grad):
                p.grad = torch.from_numpy(g.copy()) if p.grad is None else p.grad + torch.from_numpy(g)
        optimizer.step(rate)
        optimizer.zero_grad()
    return [p.detach().numpy() for p in params]


def _grads(params, updates: int, iter_size: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [
        [[rng.normal(size=p.shape).astype(np.float32) for p in params] for _ in range(iter_size)] for _ in range(updates)
    ]


def test_update_order_matches_caffes_apply_update_with_head_multipliers() -> None:
    params = _params()
    start = [p.detach().numpy().copy() for p in params]
    mults = [(10.0, 1.0), (20.0, 0.0)]  # head weight and head bias
    grads = _grads(params, updates=5, iter_size=3)
    rates = [poly_rate(2.5e-4, k, 20, 0.9) for k in range(5)]
    got = _run_caffe_sgd(params, grads, rates, mults=mults, iter_size=3)
    expected = _caffe_numpy(start, grads, rates, mults=mults, iter_size=3)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-9)


def test_weight_decay_is_not_divided_by_iter_size() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = CaffeSGD([{"params": [param], "lr_mult": 1.0, "decay_mult": 1.0}], momentum=0.9, weight_decay=DECAY, iter_size=10)
    param.grad = torch.zeros(3)
    optimizer.step(0.1)
    np.testing.assert_allclose(param.detach().numpy(), 1 - 0.1 * DECAY, rtol=1e-7)


def test_momentum_history_is_kept_across_updates_and_holds_the_rate() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = CaffeSGD([{"params": [param], "lr_mult": 1.0, "decay_mult": 0.0}], momentum=0.9, weight_decay=0.0, iter_size=1)
    for rate in (1.0, 0.5):
        param.grad = torch.ones(1)
        optimizer.step(rate)
    # history: 1.0, then 0.9 * 1.0 + 0.5 = 1.4; w = -(1.0 + 1.4)
    assert optimizer.history_of(param).item() == pytest.approx(1.4)
    assert param.item() == pytest.approx(-2.4)


def test_poly_counts_updates_from_zero_so_the_first_uses_base_lr() -> None:
    config = SolverConfig(base_lr=2.5e-4, power=0.9, max_iter=20000)
    assert config.rate(0) == 2.5e-4
    assert config.rate(10000) == pytest.approx(2.5e-4 * 0.5**0.9)
    assert config.rate(19999) == pytest.approx(2.5e-4 * (1 / 20000) ** 0.9)
    assert SolverConfig(lr_policy="fixed").rate(500) == SolverConfig().base_lr


def test_torch_sgd_differs_from_caffe_once_poly_moves_the_rate() -> None:
    mults = [(1.0, 1.0), (1.0, 1.0)]
    caffe_params, torch_params = _params(), _params()
    grads = _grads(caffe_params, updates=4, iter_size=1)
    rates = [poly_rate(0.1, k, 4, 0.9) for k in range(4)]
    torch_optimizer = torch.optim.SGD(torch_params, lr=rates[0], momentum=MOMENTUM, weight_decay=DECAY)
    caffe_after = []
    torch_after = []
    groups = [{"params": [p], "lr_mult": lr, "decay_mult": dm} for p, (lr, dm) in zip(caffe_params, mults)]
    caffe_optimizer = CaffeSGD(groups, momentum=MOMENTUM, weight_decay=DECAY, iter_size=1)
    for grad, rate in zip(grads, rates):
        for group in torch_optimizer.param_groups:
            group["lr"] = rate
        for params, optimizer in ((caffe_params, caffe_optimizer), (torch_params, torch_optimizer)):
            for p, g in zip(params, grad[0]):
                p.grad = torch.from_numpy(g.copy())
        caffe_optimizer.step(rate)
        torch_optimizer.step()
        caffe_after.append(caffe_params[0].detach().clone())
        torch_after.append(torch_params[0].detach().clone())
    torch.testing.assert_close(caffe_after[0], torch_after[0])  # same while the rate has not moved
    assert (caffe_after[-1] - torch_after[-1]).abs().max() > 1e-3


def test_release_solver_is_read_field_by_field(shared_reference: Path) -> None:
    config = read_solver(shared_reference / "deeplab_v2" / "cocostuff_deeplabv2_resnet101_solver.prototxt")
    assert config == SolverConfig(
        base_lr=2.5e-4, lr_policy="poly", power=0.9, momentum=0.9, weight_decay=5e-4, iter_size=10, max_iter=20000, snapshot=10000
    )


@pytest.mark.parametrize(
    "line, field",
    [
        ('type: "Adam"', "type"),
        ("solver_type: NESTEROV", "solver_type"),
        ("clip_gradients: 10", "clip_gradients"),
        ('regularization_type: "L1"', "regularization_type"),
        ('lr_policy: "step"', "lr_policy"),
        ("stepsize: 1000", "stepsize"),
    ],
)
def test_unsupported_solver_fields_are_refused_by_name(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text(f"base_lr: 0.001\n{line}\n")
    with pytest.raises(CaffeError, match=field):
        read_solver(path)


def test_solver_defaults_are_the_release_values_and_fields_override_them(tmp_path: Path) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text('train_net: "${EXP}/train.prototxt"\nmax_iter: 300\ndisplay: 20\nsolver_mode: GPU\n')
    assert read_solver(path) == SolverConfig(max_iter=300)


def test_solver_placeholders_are_filled_and_undefined_numeric_ones_are_named(tmp_path: Path) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text('train_net: "${EXP}/train.prototxt"\nmax_iter: ${MAX}\n')
    assert read_solver(path, {"MAX": "300", "NUM_LABELS": "21"}).max_iter == 300  # defines the file lacks are for the net
    with pytest.raises(CaffeError, match="placeholders EXP, MAX are undefined"):
        read_solver(path)
