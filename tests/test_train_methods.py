"""The gradient- and curvature-based training methods match their papers' closed forms, AWP trains at the
perturbed weights and leaves the stored ones exact, EMA is the hand-computed average, and robust early stopping
restores the best epoch."""
from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from gradguard import L2, ConfigError, Linf
from gradguard.cli import main
from gradguard.train import CURE, MART, PGDAT, GradAlign, InputGradientRegularization, Trainer, get_method

THREAT = Linf(0.1)
NEW_METHODS = ["input-grad-reg", "cure", "gradalign", "mart"]


def linear_softmax(classes: int = 10, side: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes))


def batch(classes: int = 10, n: int = 6, side: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=generator, dtype=torch.float64).float()
    return x, torch.randint(0, classes, (n,), generator=generator)


def closed_form_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇ₓ CE for logits Wx + b: Wᵀ(softmax(Wx + b) − onehot(y)), per sample."""
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    probs = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    return (probs - F.one_hot(y, weight.shape[0]).float()) @ weight


def tiny_mlp(seed: int = 0, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), activation(), nn.Linear(32, 10))


# ------------------------------------------------------------------------------------------------ closed forms
def test_input_gradient_penalty_matches_closed_form_on_linear_softmax():
    model, (x, y) = linear_softmax(), batch()
    method = InputGradientRegularization(lam=0.5)
    penalty, logits = method.penalty(model, x, y)
    expected = closed_form_input_gradient(model, x, y).pow(2).sum(dim=1).mean()
    assert torch.allclose(penalty, expected, rtol=1e-5, atol=1e-7)
    output = method.compute(model, model, x, y, None)
    assert torch.allclose(output.loss, F.cross_entropy(logits, y) + 0.5 * expected, rtol=1e-5)
    output.loss.backward()  # differentiable in the weights: double backpropagation
    assert model[1].weight.grad is not None and float(model[1].weight.grad.abs().sum()) > 0


def test_cure_penalty_matches_closed_form_on_linear_softmax():
    """For logits Wx + b: ∇ℓ(x + hz) − ∇ℓ(x) = Wᵀ(softmax(W(x + hz) + b) − softmax(Wx + b)), z = sign(∇ℓ)/‖sign(∇ℓ)‖."""
    model, (x, y) = linear_softmax(), batch()
    method = CURE(THREAT, gamma=4.0)
    h = method.step_length(x, THREAT)
    assert h == pytest.approx(0.1 * 4)  # eps·√d with d = 16: x + h·z is the FGSM point
    gradient = closed_form_input_gradient(model, x, y)
    z = gradient.sign() / gradient.sign().norm(dim=1, keepdim=True)
    moved = x.flatten(1) + h * z
    expected = (closed_form_input_gradient(model, moved.view_as(x), y) - gradient).pow(2).sum(dim=1).mean()
    penalty, _ = method.penalty(model, x, y, h)
    assert float(expected) > 1e-4
    assert torch.allclose(penalty, expected, rtol=1e-4, atol=1e-8)


def test_cure_penalty_is_zero_where_the_gradient_is_constant():
    """Two classes with equal weights: the loss is constant in x, so its curvature (and the penalty) is 0."""
    model, (x, y) = linear_softmax(classes=2), batch(classes=2)
    with torch.no_grad():
        model[1].weight[1] = model[1].weight[0]
    penalty, _ = CURE(THREAT).penalty(model, x, y, 0.4)
    assert float(penalty.detach()) < 1e-12  # zero up to the rounding of Wᵀ(p − onehot) with equal rows


def test_gradalign_penalty_is_zero_for_a_locally_linear_model_and_positive_otherwise():
    """A two-class linear model's loss gradient is (w_other − w_y)·p_other(x): always the same direction, so the
    cosine is 1; a tanh MLP with ten classes bends, so the penalty is positive."""
    x, y = batch(classes=2, n=16, side=8)
    linear = linear_softmax(classes=2, side=8)
    assert float(GradAlign(Linf(0.3)).penalty(linear, x, y, Linf(0.3)).detach()) < 1e-6
    x10, y10 = batch(classes=10, n=16, side=8)
    assert float(GradAlign(Linf(0.3)).penalty(tiny_mlp(activation=nn.Tanh), x10, y10, Linf(0.3)).detach()) > 1e-3


def test_the_overfitting_guard_follows_the_methods_single_step_property():
    """co_guard="auto" turns the guard on for the single-step methods (FGSM-AT, fast FGSM), off for the others,
    and for any TrainingMethod subclass that says ``single_step = True``."""
    from gradguard.train import METHODS, TrainingMethod

    assert {name for name, cls in METHODS.items() if cls.single_step} == {"fgsm", "fgsm-rs"}

    class OneStep(TrainingMethod):
        single_step = True

    model = tiny_mlp()
    assert Trainer(model, OneStep(THREAT), threat=THREAT, epochs=1, progress=False, val_attack=None).co_guard
    assert not Trainer(model, "pgd", threat=THREAT, epochs=1, progress=False, val_attack=None).co_guard
    assert Trainer(model, "gradalign", threat=THREAT, epochs=1, progress=False, val_attack=None,
                   co_guard=True).co_guard


def test_gradalign_gradient_from_the_primitive_is_the_summed_ce_gradient_bit_for_bit():
    """GradAlign's gradient at x comes from ``input_gradient`` (per-sample CE, summed); it equals the gradient of
    CE(reduction="sum") it replaced, bit for bit, also through a BatchNorm in train mode, and so do the penalty
    and its parameter gradients."""
    def summed_ce_gradient(forward, x, y, create_graph):  # the replaced train/methods._per_sample_input_gradient
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(forward(x), y, reduction="sum")
            return torch.autograd.grad(loss, x, create_graph=create_graph)[0]

    def old_penalty(model, x, y, threat):
        grad = summed_ce_gradient(model, x, y, False)
        grad_moved = summed_ce_gradient(model, threat.random_start(x), y, True)
        return (1 - F.cosine_similarity(grad.detach().flatten(1), grad_moved.flatten(1), dim=1)).mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(144, 10)).train()
    x, y = batch(classes=10, n=16, side=8)
    results = []
    for penalty in (old_penalty, GradAlign(Linf(0.3)).penalty):
        copy_ = copy.deepcopy(model)
        torch.manual_seed(5)
        value = penalty(copy_, x, y, Linf(0.3))
        value.backward()
        results.append((value.detach(), [p.grad for p in copy_.parameters()], copy_[1].running_mean))
    (old, old_grads, old_stats), (new, new_grads, new_stats) = results
    assert torch.equal(old, new) and torch.equal(old_stats, new_stats)
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads, strict=True))


@pytest.mark.parametrize("threat", [Linf(0.3), L2(1.0)])
def test_trades_points_are_the_last_iterate_of_a_hand_written_ascent_on_the_kl(threat):
    """TRADES' adversarial points, pinned bit for bit against the loop written out by hand: start x + 0.001·N(0, I)
    projected, ``steps`` steps of eps/4 along the threat's ascent step of ∇ KL(p(x) ‖ p(x')), projected, last
    iterate, model in eval mode. A shared projected-ascent loop replacing ``maximise_kl`` must pass this."""
    from gradguard.rng import noise_like
    from gradguard.train import TRADES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(144, 10)).train()
    reference = copy.deepcopy(model).eval()
    x, _ = batch(classes=10, n=16, side=8)
    torch.manual_seed(7)
    got = TRADES(threat, steps=4).maximise_kl(model, x, threat)
    assert model.training

    torch.manual_seed(7)
    with torch.no_grad():
        p_clean = F.softmax(reference(x), dim=1)
    want = threat.project(x + 0.001 * noise_like(x), x)
    for _ in range(4):
        leaf = want.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(reference(leaf), dim=1), p_clean, reduction="none").sum(dim=1).sum()
        (grad,) = torch.autograd.grad(kl, leaf)
        want = threat.project(want + threat.ascent_step(grad, threat.eps / 4, want), x)
    assert not torch.equal(want, x) and torch.equal(got, want)


def test_mart_loss_matches_the_paper_formula():
    generator = torch.Generator().manual_seed(3)
    clean, adv = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss, weighted_kl = MART(THREAT, beta=6.0).loss(clean, adv, y)
    total_bce, total_kl = 0.0, 0.0
    for i in range(5):
        p, q = torch.softmax(clean[i], 0).tolist(), torch.softmax(adv[i], 0).tolist()
        wrong = max((k for k in range(4) if k != int(y[i])), key=lambda k: q[k])
        total_bce += -math.log(q[y[i]]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(p[k] * (math.log(p[k] + 1e-12) - math.log(q[k] + 1e-12)) for k in range(4))
        total_kl += kl * (1.0000001 - p[y[i]])
    assert float(weighted_kl) == pytest.approx(total_kl / 5, rel=1e-5)
    assert float(loss) == pytest.approx(total_bce / 5 + 6.0 * total_kl / 5, rel=1e-5)


# ------------------------------------------------------------------------------------------------ AWP
def test_awp_perturbs_each_weight_layer_by_gamma_relative_and_differentiates_there(digits):
    model = tiny_mlp()
    x_adv, y = digits.x_train[:32], digits.y_train[:32]
    method = PGDAT(THREAT, awp_gamma=0.05)

    def objective(forward):
        return F.cross_entropy(forward(x_adv), y)

    before = copy.deepcopy(model.state_dict())
    offsets = method.awp.offsets(model, objective)
    by_name = {name: offsets.get(id(p)) for name, p in model.named_parameters()}
    assert by_name["1.bias"] is None and by_name["3.bias"] is None  # biases are not perturbed
    for name in ("1.weight", "3.weight"):
        ratio = by_name[name].norm() / before[name].norm()
        assert float(ratio) == pytest.approx(0.05, rel=1e-5)
    # gradient at w + v: the same as moving a copy's weights there in place
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if by_name[name] is not None:
                p.add_(by_name[name])
    F.cross_entropy(reference(x_adv), y).backward()
    method.awp.forward(model, model, objective)  # draws v again; the same v (deterministic objective)
    perturbed = method.awp.forward(model, model, objective)
    F.cross_entropy(perturbed(x_adv), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
        assert torch.equal(p.detach(), before[name])  # the stored weights never moved


def test_awp_training_steps_from_the_exact_unperturbed_weights(digits):
    """SGD without momentum: after every step θ_new == θ_old − lr·g bit for bit, g the (perturbed-point) gradient."""
    lr = 0.05
    model = tiny_mlp()
    steps: list[tuple[dict, dict]] = []
    previous = {name: p.detach().clone() for name, p in model.named_parameters()}

    class Recorder:
        def step(self):
            nonlocal previous
            now = {name: p.detach().clone() for name, p in model.named_parameters()}
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
            steps.append((previous, now, grads))
            previous = now

    Trainer(model, "pgd", threat=THREAT, epochs=1, batch_size=64, optimizer="sgd", lr=lr, momentum=0.0,
            method_kwargs={"steps": 2, "awp_gamma": 0.05}, monitor=Recorder(), progress=False,
            val_attack=None).fit((digits.x_train[:192], digits.y_train[:192]))
    assert len(steps) == 3
    for before, after, grads in steps:
        for name in before:
            assert torch.equal(after[name], before[name].add(grads[name], alpha=-lr)), name


def train_digits(method: str, digits, **kwargs) -> tuple[nn.Module, list[dict]]:
    model = tiny_mlp()
    options = dict(threat=THREAT, epochs=1, batch_size=64, optimizer="adam", lr=3e-3, progress=False, val_attack=None)
    options.update(kwargs)
    history = Trainer(model, method, **options).fit((digits.x_train[:128], digits.y_train[:128]))
    return model, history


@pytest.mark.parametrize("method", ["pgd", "trades", "mart"])
def test_awp_with_gamma_zero_is_the_plain_method_bit_for_bit(method, digits):
    plain, _ = train_digits(method, digits, method_kwargs={"steps": 2})
    off, _ = train_digits(method, digits, method_kwargs={"steps": 2, "awp_gamma": 0.0})
    on, _ = train_digits(method, digits, method_kwargs={"steps": 2, "awp_gamma": 0.01})
    for (name, a), b in zip(plain.state_dict().items(), off.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(plain.state_dict().values(), on.state_dict().values(),
                                                     strict=True))


# ------------------------------------------------------------------------------------------------ EMA, early stop
def test_ema_is_the_hand_computed_average_after_three_steps(digits, tmp_path):
    d = 0.5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    snapshots = [copy.deepcopy(model.state_dict())]

    class Recorder:
        def step(self):
            snapshots.append(copy.deepcopy(model.state_dict()))

    trainer = Trainer(model, "standard", epochs=1, batch_size=64, optimizer="sgd", lr=0.1, monitor=Recorder(),
                      ema_decay=d, progress=False, run_dir=tmp_path / "run")
    history = trainer.fit((digits.x_train[:192], digits.y_train[:192]))
    w0, w1, w2, w3 = snapshots
    for name, value in model.state_dict().items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, w3[name]), name  # buffers are copied, not averaged
        else:
            expected = d ** 3 * w0[name] + (1 - d) * (d ** 2 * w1[name] + d * w2[name] + w3[name])
            assert torch.allclose(value, expected, rtol=1e-5, atol=1e-7), name
            if float((w0[name] - w3[name]).abs().max()) > 1e-4:  # (the bias before BatchNorm gets ~no gradient)
                assert not torch.allclose(value, w3[name]), name
    assert history[-1]["weights"] == "ema (decay 0.5)"
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ema_decay"] == d
    assert json.loads((tmp_path / "run" / "model.json").read_text())["weights"] == "ema (decay 0.5)"


class ScriptedValidation(Trainer):
    """Validation robust accuracy from a script instead of an attack."""

    script = [0.2, 0.6, 0.4]

    def _validate(self):
        return {"val_clean_acc": 0.9, "val_robust_acc": self.script[len(self.history)]}


def test_robust_early_stopping_restores_the_best_epoch(digits, tmp_path):
    model = tiny_mlp()
    weights: list[dict] = []
    trainer = ScriptedValidation(model, "standard", threat=THREAT, epochs=3, batch_size=64, optimizer="adam", lr=1e-2,
                                 early_stop="robust", progress=False, run_dir=tmp_path / "run",
                                 on_epoch_end=lambda metrics: weights.append(copy.deepcopy(model.state_dict())))
    history = trainer.fit((digits.x_train[:128], digits.y_train[:128]), (digits.x_test[:10], digits.y_test[:10]))
    assert [h["best_epoch"] for h in history] == [1, 2, 2]
    assert history[-1]["early_stop"]["restored_epoch"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(weights[1].values(), weights[2].values(), strict=True))
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[1][name]), name
        assert torch.equal(saved[name], weights[1][name]), name
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["early_stop"] == {"criterion": "val_robust_acc", "restored_epoch": 2, "val_robust_acc": 0.6,
                                  "val_clean_acc": 0.9}
    assert json.loads((tmp_path / "run" / "model.json").read_text())["epoch"] == 2


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, options, argument", [
    ("input-grad-reg", {"lam": -1.0}, "lam"),
    ("cure", {"gamma": -0.1}, "gamma"),
    ("cure", {"h": 0.0}, "h"),
    ("gradalign", {"lam": float("nan")}, "lam"),
    ("mart", {"beta": -6}, "beta"),
    ("pgd", {"awp_gamma": -0.01}, "awp_gamma"),
    ("trades", {"awp_gamma": 1.5}, "awp_gamma"),
    ("mart", {"awp_gamma": 0.005, "awp_step_size": float("inf")}, "awp_step_size"),
    ("pgd", {"awp_gamma": 0.005, "awp_step_size": 0}, "awp_step_size"),
])
def test_bad_hyper_parameters_get_one_line_naming_the_argument(name, options, argument):
    with pytest.raises(ConfigError, match=f"^{argument}: ") as error:
        get_method(name, THREAT, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options, argument", [
    ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": 0}, "ema_decay"), ({"ema_decay": float("nan")}, "ema_decay"),
    ({"early_stop": "best"}, "early_stop"), ({"early_stop": "robust", "val_attack": None}, "early_stop"),
])
def test_bad_trainer_options_get_one_line_naming_the_argument(options, argument):
    with pytest.raises(ConfigError, match=f"^{argument}: "):
        Trainer(tiny_mlp(), "standard", threat=THREAT, **options)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_new_method_trains_an_epoch_on_digits(method, digits):
    initial = copy.deepcopy(tiny_mlp().state_dict())
    model, history = train_digits(method, digits)
    assert math.isfinite(history[-1]["train_loss"]) and math.isfinite(history[-1]["grad_norm_max"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(initial.values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_new_method_trains_from_the_cli(method, tmp_path):
    out = tmp_path / method
    options = ["--method-arg", "steps=2"] if method == "mart" else []
    code = main(["train", "--out", str(out), "--method", method, "--eps", "0.1", "--epochs", "1",
                 "--train-samples", "128", "--samples", "20", *options])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["method"]["name"] == method


def test_cli_ema_and_robust_early_stop(tmp_path):
    from gradguard import workflow

    if "ema_decay" not in inspect.signature(workflow.train_into).parameters:
        pytest.skip("workflow.train_into does not pass ema_decay/early_stop to the Trainer yet")
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--method", "pgd", "--method-arg", "steps=2", "--method-arg",
                 "awp_gamma=0.01", "--eps", "0.1", "--epochs", "2", "--train-samples", "128", "--samples", "20",
                 "--ema", "0.9", "--early-stop", "robust"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ema_decay"] == 0.9 and config["early_stop"] == "robust"
    assert config["method"]["awp_gamma"] == 0.01
    assert "early_stop" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_cli_rejects_a_bad_ema_decay_in_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--ema", "1.5", "--epochs", "1"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert "ema_decay" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_continues_the_average_and_the_best_epoch_exactly(digits, tmp_path):
    """Stopped after epoch 2 and resumed, a run with EMA and robust early stopping ends bitwise like a straight one."""
    def run(run_dir, *, stop_after: int | None = None, resume: bool = False) -> Trainer:
        def stop(metrics):
            if metrics["epoch"] == stop_after:
                raise KeyboardInterrupt

        trainer = ScriptedValidation(tiny_mlp(), "pgd", threat=THREAT, epochs=3, batch_size=64, optimizer="adam",
                                     lr=1e-2, method_kwargs={"steps": 1}, ema_decay=0.8, early_stop="robust",
                                     progress=False, run_dir=run_dir, resume=resume, on_epoch_end=stop)
        trainer.script = [0.2, 0.6, 0.4]
        trainer.fit((digits.x_train[:128], digits.y_train[:128]), (digits.x_test[:10], digits.y_test[:10]))
        return trainer

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", stop_after=2)
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.history[-1]["early_stop"]["restored_epoch"] == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[key]), key
