"""Curvature: Hessian eigenvalues, trace, density (whole and per layer) and input curvature against closed forms;
the edge-of-stability check of GradientMonitor; the model is left untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard.diagnostics import (
    GradientMonitor,
    SharpnessTracker,
    hessian_density,
    hessian_eigenvalues,
    hessian_power_iteration,
    hessian_trace,
    input_curvature,
    input_curvature_distribution,
    top_hessian_eigenvalue,
)
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


# ------------------------------------------------------------------------------------------------
# Trace, top-k, density, per layer: against a quadratic form with a known Hessian
# ------------------------------------------------------------------------------------------------
class QuadraticForm(nn.Module):
    """Output ½ θᵀAθ for every sample, θ = [first.weight; second.weight]: the Hessian of the loss is exactly A."""

    def __init__(self, matrix: torch.Tensor, split: int):
        super().__init__()
        size = matrix.shape[0]
        self.first = nn.Linear(split, 1, bias=False).double()
        self.second = nn.Linear(size - split, 1, bias=False).double()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = torch.cat([self.first.weight.flatten(), self.second.weight.flatten()])
        return (0.5 * theta @ self.matrix @ theta).expand(x.shape[0])


def identity_loss(outputs: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return outputs


def quadratic_form(size: int = 10, split: int = 4, *, diagonal_blocks: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=generator, dtype=torch.float64)
    matrix = root @ root.T / size - 0.3 * torch.eye(size, dtype=torch.float64)  # indefinite, like a real Hessian
    if diagonal_blocks:  # diagonal blocks, coupled off the diagonal: Rademacher probes of a block are exact
        for block in (slice(0, split), slice(split, size)):
            inner = matrix[block, block]
            matrix[block, block] = torch.diag(torch.diagonal(inner))
    model = QuadraticForm(matrix, split)
    x, y = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3)
    return model, x, y, matrix


def by_magnitude(values: torch.Tensor, k: int) -> list[float]:
    return sorted(values.tolist(), key=abs, reverse=True)[:k]


def test_top_k_eigenvalues_match_quadratic_form_and_lanczos_stops_at_the_dimension():
    model, x, y, matrix = quadratic_form()
    estimate = hessian_eigenvalues(model, x, y, k=4, loss_fn=identity_loss, tol=0)
    assert estimate.values == pytest.approx(by_magnitude(torch.linalg.eigvalsh(matrix), 4), rel=1e-9)
    assert estimate.converged and estimate.iterations <= 10 and estimate.dimension == 10
    assert max(estimate.residuals) < 1e-8


def test_top_k_eigenvalues_match_linear_regression_closed_form_in_fewer_products_than_power_iteration():
    model, x, targets, expected = quadratic_problem()
    # H is block diagonal with three identical blocks (2/n)·XᵀX: the top eigenvalue three times, which a
    # Krylov run finds by restarting after each exhausted block (7 products each).
    estimate = hessian_eigenvalues(model, x, targets, k=3, loss_fn=squared_error, iters=60, tol=0)
    assert estimate.values == pytest.approx([expected] * 3, rel=1e-8)
    assert estimate.iterations == 21 and estimate.converged
    power = hessian_power_iteration(model, x, targets, loss_fn=squared_error, iters=500, tol=1e-8)
    lanczos = hessian_eigenvalues(model, x, targets, k=1, loss_fn=squared_error, iters=500, tol=1e-8)
    assert lanczos.values[0] == pytest.approx(expected, rel=1e-7)
    assert lanczos.iterations < power.iterations


def test_trace_is_exact_for_diagonal_blocks_and_unbiased_with_a_standard_error_otherwise():
    model, x, y, matrix = quadratic_form(diagonal_blocks=True)
    per_layer = hessian_trace(model, x, y, loss_fn=identity_loss, per_layer=True, tol=1e-6)
    assert set(per_layer) == {"first", "second"}
    for name, block in (("first", slice(0, 4)), ("second", slice(4, 10))):
        assert per_layer[name].value == pytest.approx(float(torch.trace(matrix[block, block])), rel=1e-12)
        assert per_layer[name].standard_error == pytest.approx(0.0, abs=1e-12) and per_layer[name].converged
    model, x, y, matrix = quadratic_form(seed=1)
    full = hessian_trace(model, x, y, loss_fn=identity_loss, iters=400, tol=0.0, seed=3)
    assert full.iterations == 400 and not full.converged and full.standard_error > 0
    assert abs(full.value - float(torch.trace(matrix))) < 4 * full.standard_error
    stopped = hessian_trace(model, x, y, loss_fn=identity_loss, iters=400, tol=0.05, seed=3)
    assert stopped.converged and stopped.standard_error <= 0.05 * abs(stopped.value) and stopped.iterations < 400


def test_deflated_trace_is_unbiased_tighter_and_exact_once_the_krylov_space_is_full():
    model, x, y, matrix = quadratic_form(size=40, split=10, seed=2)
    # outlier eigenvalues along dense directions (as in networks: not aligned with single parameters)
    directions, _ = torch.linalg.qr(torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    matrix += directions @ torch.diag(torch.tensor([60.0, 40.0, 30.0], dtype=torch.float64)) @ directions.T
    expected = float(torch.trace(matrix))
    plain = hessian_trace(model, x, y, loss_fn=identity_loss, iters=60, tol=0.0, seed=5)
    deflated = hessian_trace(model, x, y, loss_fn=identity_loss, iters=60, tol=0.0, seed=5, deflation=10)
    assert plain.iterations == deflated.iterations == 60
    assert abs(deflated.value - expected) < 4 * deflated.standard_error
    assert deflated.standard_error < plain.standard_error / 3
    full = hessian_trace(model, x, y, loss_fn=identity_loss, iters=50, tol=0.0, deflation=45)
    assert full.value == pytest.approx(expected, rel=1e-10) and full.converged and full.iterations == 40


def test_density_nodes_are_the_eigenvalues_and_moments_are_exact_traces_of_powers():
    model, x, y, matrix = quadratic_form(diagonal_blocks=True)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    density = hessian_density(model, x, y, loss_fn=identity_loss, n_v=2, m=20)
    for run_nodes, run_weights in zip(density.nodes, density.weights, strict=True):
        assert sorted(run_nodes) == pytest.approx(eigenvalues.tolist(), abs=1e-9)
        assert sum(run_weights) == pytest.approx(1.0, rel=1e-12)
    per_layer = hessian_density(model, x, y, loss_fn=identity_loss, m=20, per_layer=True)
    for name, block in (("first", slice(0, 4)), ("second", slice(4, 10))):
        sub = matrix[block, block]  # diagonal: zᵀ Sᵖ z = tr(Sᵖ) for every Rademacher z
        for power in (1, 2, 3):
            assert per_layer[name].moment(power) == pytest.approx(float(torch.trace(torch.linalg.matrix_power(sub, power))),
                                                                  rel=1e-9)
    grid, values = torch.tensor(density.grid), torch.tensor(density.density)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)


def test_per_layer_equals_the_blocks_of_the_dense_hessian_of_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    params = list(model.parameters())
    dense = torch.autograd.functional.hessian(
        lambda *flat: nn.functional.cross_entropy(torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], flat, strict=True)), (x,)), y),
        tuple(p.detach() for p in params))
    blocks = {"0": (0, 1), "2": (2, 3)}
    eigen = hessian_eigenvalues(model, x, y, k=2, per_layer=True, iters=100, tol=0, batch_size=16)
    trace = hessian_trace(model, x, y, per_layer=True, iters=5, tol=0)
    assert set(eigen) == set(blocks) == set(trace)
    for name, (weight, bias) in blocks.items():
        sizes = [params[weight].numel(), params[bias].numel()]
        block = torch.cat([torch.cat([dense[i][j].reshape(sizes[i - weight], sizes[j - weight])
                                      for j in (weight, bias)], 1) for i in (weight, bias)], 0)
        assert eigen[name].values == pytest.approx(by_magnitude(torch.linalg.eigvalsh(block), 2), rel=1e-7)
        assert eigen[name].dimension == sum(sizes) and trace[name].dimension == sum(sizes)


def test_new_estimators_leave_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    model[0].bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    first = hessian_eigenvalues(model, x, y, k=2, iters=10)
    hessian_trace(model, x, y, iters=3, per_layer=True)
    hessian_density(model, x, y, m=5)
    assert hessian_eigenvalues(model, x, y, k=2, iters=10).values == first.values
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert model[0].bias.requires_grad is False


def test_new_estimators_reject_bad_arguments_with_one_line():
    model, x, y, _ = quadratic_form()
    with pytest.raises(ConfigError, match="k: .*only 10"):
        hessian_eigenvalues(model, x, y, k=11, loss_fn=identity_loss)
    with pytest.raises(ConfigError, match="tol"):
        hessian_trace(model, x, y, tol=-1, loss_fn=identity_loss)
    with pytest.raises(ConfigError, match="deflation"):
        hessian_trace(model, x, y, iters=5, deflation=5, loss_fn=identity_loss)
    with pytest.raises(ConfigError, match="n_v"):
        hessian_density(model, x, y, n_v=0, loss_fn=identity_loss)
    with pytest.raises(ConfigError, match="quantiles"):
        input_curvature_distribution(nn.Linear(3, 2), (torch.rand(4, 3), torch.zeros(4, dtype=torch.long)),
                                     quantiles=(1.5,))


def test_input_curvature_distribution_streams_batches_and_summarises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(25, 6, dtype=torch.float64), torch.randint(0, 3, (25,))
    summary = input_curvature_distribution(model, (x, y), batch_size=4, method="hvp")
    expected = input_curvature(model, x, y, method="hvp").double()
    assert torch.allclose(summary.values, expected, rtol=1e-10)
    streamed = input_curvature_distribution(model, [(x[:10], y[:10]), (x[10:], y[10:])], method="hvp")
    assert torch.allclose(streamed.values, expected, rtol=1e-10)
    assert summary.mean == pytest.approx(float(expected.mean()))
    assert summary.quantiles["q50"] == pytest.approx(float(expected.median().item()) if len(expected) % 2 else
                                                     float(torch.quantile(expected, 0.5)))
    assert list(summary.quantiles) == ["q05", "q25", "q50", "q75", "q95"]
    assert summary.to_dict()["n_samples"] == 25


# ------------------------------------------------------------------------------------------------
# Edge of stability in GradientMonitor
# ------------------------------------------------------------------------------------------------
def regression_run(lr_times_sharpness: float, steps: int, *, momentum: float = 0.0):
    """Full-batch SGD on linear least squares: λ_max is known, and SGD diverges iff lr·λ_max > 2(1 + μ)."""
    model, x, targets, sharpness = quadratic_problem()
    lr = lr_times_sharpness / sharpness
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    monitor = GradientMonitor(model, every=100, curvature_every=2, curvature_iters=20,
                              curvature_loss=squared_error, lr=lr)
    losses = []
    with monitor:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = squared_error(model(x), targets).mean()
            loss.backward()
            optimizer.step()
            monitor.step(loss, targets=targets)
            losses.append(float(loss.detach()))
    return monitor, losses, sharpness


def test_monitor_flags_a_learning_rate_past_the_edge_of_stability_before_the_loss_diverges():
    monitor, losses, sharpness = regression_run(2.6, 6)
    findings = [f for f in monitor.findings() if f.kind == "sharpness"]
    assert len(findings) == 1 and findings[0].evidence["first_step"] == 0
    assert findings[0].evidence["ratio"] == pytest.approx(1.3, rel=0.02)
    assert findings[0].evidence["top_eigenvalue"] == pytest.approx(sharpness, rel=0.02)
    assert losses[1] < 10 * losses[0]  # flagged at step 0, while the loss had not blown up yet
    assert [r["step"] for r in monitor.curvature_records] == [0, 2, 4]


def test_monitor_stays_quiet_on_a_stable_learning_rate():
    monitor, losses, _ = regression_run(1.0, 6)
    assert losses[-1] < losses[0]
    assert not [f for f in monitor.findings() if f.kind == "sharpness"]
    assert all(0.45 < r["ratio"] < 0.55 for r in monitor.curvature_records)


def test_sharpness_tracker_uses_adams_preconditioned_threshold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    tracker = SharpnessTracker(model, 1, optimizer=optimizer)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    record = tracker.measure(0, x, y)
    assert record["quantity"] == "preconditioned sharpness"
    assert record["threshold"] == pytest.approx(38 / 1e-2)
    with pytest.raises(ConfigError, match="curvature_every"):
        SharpnessTracker(model, 1)


# ------------------------------------------------------------------------------------------------
# diagnose --curvature: into the run directory and the report
# ------------------------------------------------------------------------------------------------
def test_diagnose_curvature_writes_results_and_plots_and_the_report_shows_them(tmp_path):
    import json

    from gradguard.data import TensorSampleSet
    from gradguard.io import atomic_write_json
    from gradguard.report import build_report
    from gradguard.workflow import _curvature_into

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    data = TensorSampleSet("toy", ["a", "b", "c"], torch.rand(50, 1, 4, 4), torch.randint(0, 3, (50,)))
    result = _curvature_into(tmp_path, model, data, samples=40, seed=0, device=torch.device("cpu"))
    assert len(result["top_eigenvalues"]["values"]) == 5 and result["n_samples"] == 40
    assert result["top_hessian_eigenvalue"] == result["top_eigenvalues"]["values"][0]
    assert [row["layer"] for row in result["per_layer"]] == ["1", "3"]
    assert sum(row["parameters"] for row in result["per_layer"]) == result["parameters"] == 16 * 8 + 8 + 8 * 3 + 3
    assert result["input_curvature"]["n_samples"] == 40 and len(result["input_curvature"]["values"]) == 40
    assert sum(result["density"]["weights"][0]) == pytest.approx(1.0)
    for name in ("hessian_density.png", "input_curvature.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")
    atomic_write_json(tmp_path / "diagnosis.json", {"curvature": result})
    html = build_report(tmp_path).read_text()
    assert "Hessian eigenvalue density" in html and "trace (Hutchinson)" in html
    assert f"{result['top_hessian_eigenvalue']:.4g}" in html
    assert json.loads((tmp_path / "diagnosis.json").read_text())["curvature"]["trace"]["products"] >= 10


def test_monitor_counting_through_the_optimiser_measures_on_schedule_and_removes_its_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with GradientMonitor(model, every=5, optimizer=optimizer, curvature_every=3) as monitor:
        for _ in range(7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            monitor.step()
    records = monitor.curvature_records
    assert [r["step"] for r in records] == [0, 3, 6]
    assert all(r["threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1) and r["top_eigenvalue"] > 0 for r in records)
    assert not model._forward_pre_hooks and not [f for f in monitor.findings() if f.kind == "sharpness"]


def test_top_eigenvalue_falls_back_to_power_iteration_when_the_lanczos_basis_would_be_too_big(monkeypatch):
    from gradguard.diagnostics.curvature import spectrum

    model, x, targets, expected = quadratic_problem()
    monkeypatch.setattr(spectrum, "LANCZOS_BASIS_BYTES", 0)  # where top_hessian_eigenvalue reads it
    value = top_hessian_eigenvalue(model, x, targets, loss_fn=squared_error, iters=7, tol=0)
    assert value == hessian_power_iteration(model, x, targets, loss_fn=squared_error, iters=7, tol=0).value
    assert value != pytest.approx(expected, rel=1e-9)  # 7 power steps are not converged; Lanczos would be exact
    monkeypatch.undo()
    assert top_hessian_eigenvalue(model, x, targets, loss_fn=squared_error, iters=7, tol=0) == pytest.approx(expected)
