"""GradientMonitor: hooks only, exact per-layer numbers, findings on the demo models, jsonl round trip, plots."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gradguard import models
from gradguard.diagnostics import Finding, GradientMonitor, findings_from_records, gradflow, load_gradflow
from gradguard.errors import ConfigError, DataError, InputError


def mlp(linears: int, activation: type[nn.Module], *, width: int = 64, **kwargs) -> nn.Module:
    """The zoo MLP on 8×8 digits with `linears` Linear layers in all (the zoo's depth counts hidden ones)."""
    return models.mlp(depth=linears - 1, width=width, activation=activation.__name__.lower(), input_shape=(1, 8, 8),
                      **kwargs)


def train_monitored(model: nn.Module, digits, *, optimizer: str = "sgd", lr: float = 0.1, clip: float | None = None,
                    epochs: int = 2, every: int = 2, seed: int = 0, path=None) -> GradientMonitor:
    """Train on digits with the monitor counting steps through the optimiser's hooks."""
    torch.manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = digits.x_train, digits.y_train
    with GradientMonitor(model, every=every, optimizer=opt, path=path) as monitor:
        for _ in range(epochs):
            order = torch.randperm(len(y))
            for start in range(0, len(y), 64):
                batch = order[start:start + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
    return monitor


def kinds(findings: list[Finding]) -> set[str]:
    return {finding.kind for finding in findings}


# ------------------------------------------------------------------------------------------------
# Findings on the demo models (the thresholds come from bench/diagnostics_calibration.py)
# ------------------------------------------------------------------------------------------------
def test_deep_sigmoid_mlp_with_default_init_is_flagged_vanishing(digits):
    torch.manual_seed(0)
    model = mlp(12, nn.Sigmoid)
    findings = train_monitored(model, digits, epochs=1).findings()
    vanishing = [f for f in findings if f.kind == "vanishing"]
    assert len(vanishing) == 1
    evidence = vanishing[0].evidence
    assert vanishing[0].layer == "1" and evidence["first_layer"] == "1" and evidence["last_layer"] == "23"
    assert evidence["grad_ratio_first_last"] < gradflow.VANISHING_RATIO
    assert evidence["grad_norm_first"] < 1e-3 * evidence["grad_norm_last"]
    assert "ReLU" in vanishing[0].advice and "He" in vanishing[0].advice


@pytest.mark.parametrize("variant", ["relu-he", "relu-batchnorm"])
def test_same_depth_relu_with_he_init_or_batchnorm_is_not_flagged_vanishing(digits, variant):
    torch.manual_seed(0)
    model = mlp(12, nn.ReLU, init="he") if variant == "relu-he" else mlp(12, nn.ReLU, norm=True)
    monitor = train_monitored(model, digits, optimizer="adam", lr=1e-3)
    assert "vanishing" not in kinds(monitor.findings())
    ratios = gradflow.RecordTable(monitor.records).depth_ratios("1", monitor.layer_names[-1])
    assert min(r for _, r in ratios) > 1e-2  # orders of magnitude above the sigmoid net, not just above the line


def test_huge_learning_rate_without_clipping_is_flagged_exploding(digits):
    torch.manual_seed(0)
    findings = train_monitored(mlp(4, nn.ReLU), digits, lr=2.0, epochs=3).findings()
    exploding = [f for f in findings if f.kind == "exploding"]
    assert len(exploding) == 1
    evidence = exploding[0].evidence
    assert evidence.get("nonfinite_step") is not None or evidence["growth"] >= gradflow.EXPLODING_GROWTH
    assert "clip" in exploding[0].advice and "learning rate" in exploding[0].advice


def test_same_run_with_clip_grad_norm_is_not_flagged_exploding(digits):
    torch.manual_seed(0)
    monitor = train_monitored(mlp(4, nn.ReLU), digits, lr=2.0, epochs=3, clip=1.0)
    assert "exploding" not in kinds(monitor.findings())
    # Clipping bounds what the optimiser applies; the raw gradients stayed bounded too.
    assert max(r["grad_norm"] for r in monitor.records if r["grad_norm"] is not None) <= 1.0 + 1e-6
    assert max(r["raw_grad_norm"] or 0.0 for r in monitor.records) < 1e3


def test_nan_gradient_is_flagged_nonfinite_with_the_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with GradientMonitor(model, every=1) as monitor:
        for step in range(3):
            model.zero_grad()
            scale = float("nan") if step == 2 else 1.0
            (model(torch.ones(5, 3)).sum() * scale).backward()
            monitor.step()
    nonfinite = [f for f in monitor.findings() if f.kind == "nonfinite"]
    assert nonfinite and nonfinite[0].evidence["first_step"] == 2
    assert nonfinite[0].layer == "2"  # the backward pass reaches the last Linear first
    assert all(r["grad_finite"] is False for r in monitor.records if r["step"] == 2)


def test_relu_net_with_strongly_negative_bias_is_flagged_dead(digits):
    torch.manual_seed(0)
    monitor = train_monitored(mlp(4, nn.ReLU, bias=-5.0), digits, optimizer="adam", lr=1e-3, epochs=1)
    dead = [f for f in monitor.findings() if f.kind == "dead"]
    assert {f.layer for f in dead} == {"1", "3", "5"}  # every hidden layer, not the head
    assert all(f.evidence["dead_fraction"] == 1.0 and f.evidence["activation"] == "relu" for f in dead)
    assert "vanishing" not in kinds(monitor.findings())  # the zero gradient is explained by the dead units


def test_healthy_relu_mlp_has_no_findings(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    assert train_monitored(model, digits, optimizer="adam", lr=1e-2).findings() == []


def test_tanh_net_with_large_init_is_flagged_saturated(digits):
    torch.manual_seed(0)
    monitor = train_monitored(mlp(4, nn.Tanh, init="large"), digits, epochs=1)
    saturated = [f for f in monitor.findings() if f.kind == "saturated"]
    assert saturated and all(f.evidence["saturated_fraction"] >= gradflow.SATURATED_FRACTION for f in saturated)
    torch.manual_seed(0)
    assert "saturated" not in kinds(train_monitored(mlp(4, nn.Tanh), digits, epochs=1).findings())


def test_layer_with_tiny_learning_rate_is_flagged_stalled(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD([{"params": model[1].parameters(), "lr": 1e-6},
                           {"params": list(model[3].parameters()) + list(model[5].parameters())}], lr=0.1)
    with GradientMonitor(model, every=1, optimizer=opt) as monitor:
        for start in range(0, 640, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(digits.x_train[start:start + 64]), digits.y_train[start:start + 64]).backward()
            opt.step()
    stalled = [f for f in monitor.findings() if f.kind == "stalled"]
    assert [f.layer for f in stalled] == ["1"]
    assert stalled[0].evidence["relative"] < gradflow.STALLED_FACTOR


def _records(grad_norms: dict[str, list[float]], numel: int = 100) -> list[dict]:
    """Synthetic records: one per layer and sample, with the given gradient norms (layers in dict order)."""
    records = []
    for index, (layer, norms) in enumerate(grad_norms.items()):
        for step, norm in enumerate(norms):
            records.append({"step": step * 10, "layer": layer, "index": index, "numel": numel, "grad_norm": norm,
                            "grad_max": norm, "grad_finite": True, "weight_finite": True, "update_ratio": 1e-3})
    return records


def test_vanishing_also_fires_when_the_depth_ratio_collapses_over_time():
    # first/last starts at 10 and ends at 5e-3: above the level threshold, but a 2000x fall
    falling = _records({"first": [10.0] * 3 + [0.005] * 5, "last": [1.0] * 8})
    vanishing = [f for f in findings_from_records(falling) if f.kind == "vanishing"]
    assert vanishing and vanishing[0].evidence["grad_ratio_first_last"] == pytest.approx(0.005)
    assert vanishing[0].evidence["grad_ratio_first_last_at_start"] == pytest.approx(10.0)
    steady = _records({"first": [10.0] * 3 + [0.5] * 5, "last": [1.0] * 8})  # a 20x fall is normal
    assert "vanishing" not in kinds(findings_from_records(steady))


def test_exploding_jump_fires_but_a_converged_model_recovering_does_not():
    jump = _records({"a": [1.0] * 6 + [3e3, 3e3], "b": [1.0] * 8})
    exploding = [f for f in findings_from_records(jump) if f.kind == "exploding"]
    assert exploding and exploding[0].evidence["largest_jump"] >= gradflow.EXPLODING_JUMP
    # gradient decays to 1e-6 as the model converges, then a hard batch brings it back to 0.5: below the start
    recovering = _records({"a": [1.0, 1.0, 1.0, 1e-3, 1e-6, 1e-6, 1e-6, 0.5], "b": [1.0, 1.0, 1.0] + [1e-6] * 5})
    assert "exploding" not in kinds(findings_from_records(recovering))


# ------------------------------------------------------------------------------------------------
# Exact numbers
# ------------------------------------------------------------------------------------------------
def test_records_match_hand_computed_norms_and_sgd_update_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # plain SGD: Δθ = -lr·g exactly
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with GradientMonitor(model, every=1) as monitor:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {name: [p.grad.clone() for p in model[int(name)].parameters()] for name in ("0", "2")}
        weights = {name: [p.detach().clone() for p in model[int(name)].parameters()] for name in ("0", "2")}
        opt.step()
        monitor.step()
    for record in monitor.records:
        g, w = grads[record["layer"]], weights[record["layer"]]
        grad_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        weight_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in w))
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        assert record["grad_max"] == pytest.approx(max(float(t.abs().max()) for t in g), rel=1e-6)
        assert record["raw_grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        assert record["update_ratio"] == pytest.approx(0.05 * grad_norm / weight_norm, rel=1e-4)
        new_weight_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model[int(record["layer"])].parameters()))
        assert record["weight_norm"] == pytest.approx(new_weight_norm, rel=1e-6)
    assert [r["layer"] for r in monitor.records] == ["0", "2"]


def test_raw_gradient_norm_is_taken_before_clipping_on_consecutive_sampled_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = []
    with GradientMonitor(model, every=1, optimizer=opt) as monitor:
        for _ in range(3):  # every step sampled: the hooks stay registered from one step to the next
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(8, 6) * 10), torch.randint(0, 3, (8,))).backward()
            raw = {name: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model[int(name)].parameters()))
                   for name in ("0", "2")}
            nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            clipped = {name: max(float(p.grad.abs().max()) for p in model[int(name)].parameters()) for name in raw}
            expected.append((raw, clipped))
            opt.step()
    assert [r["step"] for r in monitor.records] == [0, 0, 1, 1, 2, 2]
    for record in monitor.records:
        raw, clipped = expected[record["step"]]
        assert record["raw_grad_norm"] == pytest.approx(raw[record["layer"]], rel=1e-5)
        assert record["grad_norm"] < 1e-3 + 1e-9 < raw[record["layer"]]  # what the optimiser applied
        assert record["grad_max"] == pytest.approx(clipped[record["layer"]], rel=1e-5)
        assert record["update_ratio"] == pytest.approx(0.05 * record["grad_norm"] / record["weight_norm"], rel=1e-3)


def test_dead_and_saturated_fractions_match_constructed_layers():
    relu_layer = nn.Linear(2, 4)
    with torch.no_grad():  # units 0, 1 always positive; units 2, 3 never (inputs are non-negative)
        relu_layer.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, -1.0], [0.0, -3.0]]))
        relu_layer.bias.copy_(torch.tensor([0.1, 0.1, -0.1, -0.1]))
    sigmoid_layer = nn.Linear(4, 4)
    with torch.no_grad():  # output pre-activations 20, -20 (saturated) and 0, 0.5 (not)
        sigmoid_layer.weight.zero_()
        sigmoid_layer.bias.copy_(torch.tensor([20.0, -20.0, 0.0, 0.5]))
    model = nn.Sequential(relu_layer, nn.ReLU(), sigmoid_layer, nn.Sigmoid(), nn.Linear(4, 2))
    with GradientMonitor(model, every=1) as monitor:
        model(torch.rand(16, 2)).sum().backward()
        monitor.step()
    by_layer = {r["layer"]: r for r in monitor.records}
    assert by_layer["0"]["dead_fraction"] == 0.5 and by_layer["0"]["activation"] == "relu"
    assert by_layer["2"]["saturated_fraction"] == 0.5 and by_layer["2"]["activation"] == "sigmoid"
    assert by_layer["4"]["dead_fraction"] is None and by_layer["4"]["saturated_fraction"] is None


def test_forwards_without_parameter_gradients_do_not_count_as_activations():
    from gradguard.attacks.base import model_guard

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():  # units 0, 1 fire for positive inputs, unit 2 only for negative ones
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    with GradientMonitor(model, every=1) as monitor:
        with torch.no_grad():
            model(-torch.ones(4, 2))  # an evaluation pass: would wake unit 2 up
        with model_guard(model):  # an attack's forward: frozen weights, gradient w.r.t. the input only
            x = -torch.ones(4, 2, requires_grad=True)
            torch.autograd.grad(model(x).sum(), x)
        model(torch.rand(4, 2)).sum().backward()  # the training forward: unit 2 stays silent
        monitor.step()
    assert monitor.records[0]["dead_fraction"] == pytest.approx(1 / 3)


def test_monitor_handed_to_a_loop_without_attach_attaches_itself():
    model = _small_model()
    monitor = GradientMonitor(model, every=2)
    _train_steps(model, 5, monitor)
    assert monitor.attached and sorted({r["step"] for r in monitor.records}) == [2, 4]
    monitor.detach()
    assert not monitor.attached


# ------------------------------------------------------------------------------------------------
# Hooks only: the model is untouched and non-sampled steps cost a flag check
# ------------------------------------------------------------------------------------------------
def _train_steps(model: nn.Module, steps: int, monitor: GradientMonitor | None = None) -> torch.optim.Optimizer:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    return opt


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.Sigmoid())


def test_monitor_leaves_model_untouched():
    plain, watched = _small_model(), _small_model()
    watched[3].bias.requires_grad_(True)
    flags = [p.requires_grad for p in watched.parameters()]
    _train_steps(plain, 6)
    with GradientMonitor(watched, every=2) as monitor:
        _train_steps(watched, 6, monitor)
    # Bit-identical training: same parameters, buffers, gradients and modes as without the monitor.
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert [m.training for m in plain.modules()] == [m.training for m in watched.modules()]
    assert [p.requires_grad for p in watched.parameters()] == flags
    for module in watched.modules():  # every hook removed on exit
        assert not module._forward_hooks and not module._forward_pre_hooks
    for param in watched.parameters():
        assert not getattr(param, "_post_accumulate_grad_hooks", None)
    assert len({r["step"] for r in monitor.records}) == 3  # steps 0, 2, 4


def test_monitor_does_no_work_on_non_sampled_steps(monkeypatch):
    model = _small_model()
    calls: list[tuple[int, str]] = []
    monitor = GradientMonitor(model, every=5)
    for name in ("_layer_pre_hook", "_activation_hook", "_raw_gradient_hook", "_enter_layer", "_record_activation",
                 "_record_raw_gradient", "_read_gradients", "_finish_sample"):
        original = getattr(monitor, name)

        def counting(*args, _original=original, _name=name):
            calls.append((monitor.step_count, _name))
            return _original(*args)

        monkeypatch.setattr(monitor, name, counting)
    def model_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with monitor:
        _train_steps(model, 8, monitor)
        hooks_on_step_8 = model_hooks()  # step 8 is not sampled
        _train_steps(model, 2, monitor)
        hooks_on_step_10 = model_hooks()  # step 10 is sampled: armed before it begins
    # Only steps 0 and 5 ran anything; on the others the model carried no hooks at all.
    assert {step for step, _ in calls} == {0, 5}
    for step in (0, 5):
        hooks = [name for s, name in calls if s == step and name.endswith("_hook")]
        # 3 layer pre-hooks (Linear, BatchNorm, Linear) + 2 activation hooks + 6 parameter gradient hooks
        assert len(hooks) == 3 + 2 + 6
        assert [name for s, name in calls if s == step].count("_finish_sample") == 1
    # step 10's model hooks: 3 layer pre-hooks + 2 activation hooks + the model's own output hook (its width C)
    assert hooks_on_step_8 == 0 and hooks_on_step_10 == 3 + 2 + 1
    assert model_hooks() == 0 and monitor.step_count == 10


def test_optimizer_hooks_count_steps_and_manual_step_is_harmless():
    model = _small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, every=3, optimizer=opt) as monitor:
        for _ in range(7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
            opt.step()
            monitor.step()  # e.g. a Trainer calling step() too: must not double count
    assert monitor.step_count == 7
    assert sorted({r["step"] for r in monitor.records}) == [0, 3, 6]
    assert all(r["update_ratio"] is not None and r["update_ratio"] > 0 for r in monitor.records)


def test_trainer_calls_monitor_after_each_optimizer_step(digits, tmp_path):
    from gradguard.train import Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    monitor = GradientMonitor(model, every=4, path=tmp_path / "gradflow.jsonl")
    with monitor:
        Trainer(model, epochs=1, batch_size=128, optimizer="adam", lr=1e-3, progress=False, monitor=monitor,
                val_attack=None).fit((digits.x_train, digits.y_train))
    steps_per_epoch = math.ceil(len(digits.y_train) / 128)
    assert monitor.step_count == steps_per_epoch
    assert sorted({r["step"] for r in monitor.records}) == list(range(0, steps_per_epoch, 4))
    assert load_gradflow(tmp_path / "gradflow.jsonl") == monitor.records


# ------------------------------------------------------------------------------------------------
# Files, plots and errors
# ------------------------------------------------------------------------------------------------
def test_gradflow_jsonl_round_trip_gives_the_same_findings(digits, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "run" / "gradflow.jsonl"
    monitor = train_monitored(mlp(12, nn.Sigmoid), digits, epochs=1, path=path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(monitor.records) and all(json.loads(line) for line in lines)
    records = load_gradflow(path.parent)  # a run directory works too
    assert records == monitor.records
    assert [f.to_dict() for f in findings_from_records(records)] == [f.to_dict() for f in monitor.findings()]
    assert "vanishing" in kinds(findings_from_records(records))


def test_plot_writes_three_pngs(tmp_path):
    model = _small_model()
    with GradientMonitor(model, every=1) as monitor:
        _train_steps(model, 3, monitor)
    paths = monitor.plot(tmp_path / "plots")
    assert [p.name for p in paths] == ["gradient_flow.png", "grad_norm_heatmap.png", "activation_health.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="every"):
        GradientMonitor(nn.Linear(2, 2), every=0)
    with pytest.raises(InputError, match="model"):
        GradientMonitor(nn.ReLU())
    with pytest.raises(InputError, match="optimizer"):
        GradientMonitor(nn.Linear(2, 2), optimizer="sgd")
    with pytest.raises(DataError, match="does not exist"):
        load_gradflow(tmp_path / "missing.jsonl")
    corrupt = tmp_path / "gradflow.jsonl"
    corrupt.write_text('{"step": 0, "layer": "a"}\n{not json\n')
    with pytest.raises(DataError, match="line 2"):
        load_gradflow(corrupt)
    from gradguard.diagnostics.plots import plot_all

    with pytest.raises(InputError, match="records"):
        plot_all([], tmp_path)


def test_no_records_is_not_an_all_clear():
    assert [f.kind for f in findings_from_records([])] == ["unrecorded"]


def _diagnostics_imports() -> dict[str, set[str]]:
    """Sibling modules each diagnostics module imports, at any level (function-level imports count too)."""
    import ast
    from pathlib import Path

    import gradguard.diagnostics as package

    folder = Path(package.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradguard.diagnostics."):
                targets.add(node.module.rsplit(".", 1)[1])
        graph[name] = targets & modules
    return graph


def test_diagnostics_imports_go_one_way():
    graph = _diagnostics_imports()
    assert "health" in graph["plots"] and "gradflow" not in graph["plots"]

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[start])

    circles = [name for name in graph if reaches(name, name)]
    assert not circles, f"import circle through {circles}: {graph}"
