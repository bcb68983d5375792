"""Curvature: Hessian top eigenvalue and input curvature against closed forms; the model is left untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.diagnostics import hessian_power_iteration, input_curvature, top_hessian_eigenvalue
from gradguard.errors import ConfigError, InputError, ShapeError


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).pow(2).sum(1)


def quadratic_problem(n: int = 40, features: int = 6, outputs: int = 3, seed: int = 0):
    """Linear regression with squared error: L(W, b) = mean_i ‖W x_i + b - t_i‖², a quadratic in (W, b).

    Its Hessian is block diagonal, one block per output: (2/n) · Σ_i [x_i; 1][x_i; 1]ᵀ.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2.0, features, dtype=torch.float64)
    targets = torch.randn(n, outputs, generator=generator, dtype=torch.float64)
    model = nn.Linear(features, outputs).double()
    augmented = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    hessian_block = 2.0 / n * augmented.T @ augmented
    return model, x, targets, float(torch.linalg.eigvalsh(hessian_block).max())


def test_top_eigenvalue_matches_quadratic_model_closed_form():
    model, x, targets, expected = quadratic_problem()
    value = top_hessian_eigenvalue(model, x, targets, loss_fn=squared_error, iters=200, tol=1e-10)
    assert value == pytest.approx(expected, rel=1e-3)


def test_batched_hessian_products_equal_the_full_batch():
    model, x, targets, expected = quadratic_problem()
    full = hessian_power_iteration(model, x, targets, loss_fn=squared_error, iters=200, tol=1e-10)
    batched = hessian_power_iteration(model, x, targets, loss_fn=squared_error, iters=200, tol=1e-10, batch_size=7)
    assert full.converged and batched.converged
    assert batched.value == pytest.approx(full.value, rel=1e-6)
    assert batched.value == pytest.approx(expected, rel=1e-3)


def test_top_eigenvalue_matches_dense_hessian_for_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(vector):
        pieces, offset = [], 0
        for shape in shapes:
            size = torch.Size(shape).numel()
            pieces.append(vector[offset:offset + size].view(shape))
            offset += size
        hidden = torch.tanh(x @ pieces[0].T + pieces[1])
        return nn.functional.cross_entropy(hidden @ pieces[2].T + pieces[3], y)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    largest_magnitude = float(eigenvalues[eigenvalues.abs().argmax()])
    value = top_hessian_eigenvalue(model, x, y, iters=500, tol=1e-10)
    assert value == pytest.approx(largest_magnitude, rel=1e-3)


def test_hessian_leaves_model_untouched_and_uses_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    model[0].bias.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    first = top_hessian_eigenvalue(model, x, y, iters=30)
    second = top_hessian_eigenvalue(model, x, y, iters=30)
    assert first == second  # deterministic: eval mode (no dropout noise, no BatchNorm statistics update)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running statistics included
    assert all(m.training for m in model.modules())
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    assert torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 7.0))
    assert model[0].weight.grad is None


def test_time_limit_stops_power_iteration_early():
    model, x, targets, _ = quadratic_problem()
    estimate = hessian_power_iteration(model, x, targets, loss_fn=squared_error, iters=10**6, tol=0.0, time_limit=0.2)
    assert not estimate.converged and 1 <= estimate.iterations < 10**6


def test_input_curvature_matches_quadratic_closed_form():
    """logits = B x and ℓ = ½‖logits‖²: ∇ℓ = BᵀB x, ∇²ℓ = BᵀB, curvature = gᵀBᵀBg / ‖g‖²."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    gram = model.weight.detach().T @ model.weight.detach()
    g = x @ gram
    expected = ((g @ gram) * g).sum(1) / (g * g).sum(1)

    def half_squared_norm(logits, _):
        return 0.5 * logits.pow(2).sum(1)

    for method in ("finite-difference", "hvp"):
        curvature = input_curvature(model, x, y, loss_fn=half_squared_norm, method=method)
        assert curvature.shape == (6,)
        assert torch.allclose(curvature, expected, rtol=1e-6), method


def test_input_curvature_finite_difference_agrees_with_hvp_on_smooth_model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.rand(10, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    exact = input_curvature(model, x, y, method="hvp")
    finite = input_curvature(model, x, y, h=1e-4)
    assert torch.allclose(finite, exact, rtol=1e-4, atol=1e-8)
    assert torch.allclose(input_curvature(model, x, y, method="hvp", batch_size=3), exact, rtol=1e-10, atol=1e-12)


def test_input_curvature_is_zero_without_gradient_and_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU dead: the loss is constant in x
    flags = [p.requires_grad for p in model.parameters()]
    curvature = input_curvature(model, torch.rand(5, 3), torch.zeros(5, dtype=torch.long))
    assert torch.equal(curvature, torch.zeros(5))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_curvature_errors_name_the_argument():
    model = nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="iters"):
        top_hessian_eigenvalue(model, x, y, iters=0)
    with pytest.raises(ConfigError, match="time_limit"):
        top_hessian_eigenvalue(model, x, y, time_limit=-1)
    with pytest.raises(ShapeError, match="y"):
        top_hessian_eigenvalue(model, x, y[:3])
    with pytest.raises(InputError, match="x"):
        input_curvature(model, x.long(), y)
    with pytest.raises(InputError, match="NaN"):
        input_curvature(model, torch.full((4, 3), float("nan")), y)
    with pytest.raises(ConfigError, match="method"):
        input_curvature(model, x, y, method="exact")
    with pytest.raises(ConfigError, match="h"):
        input_curvature(model, x, y, h=0)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(InputError, match="requires_grad"):
        top_hessian_eigenvalue(frozen, x, y)
