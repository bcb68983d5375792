"""Devices and mixed precision: amp for attack gradients with a full-precision re-check, channels_last, devices."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradguard import L2, Linf
from gradguard.attacks import APGD, APGDT, CW, FGSM, PGD, DeepFool, Square
from gradguard.attacks.base import autocast, prepare_model, resolve_amp, resolve_device
from gradguard.errors import ConfigError
from model_checks import assert_same_state, model_state

# Every attack family, small budgets; CW is L2-only, the rest run under L∞.
FAMILIES = {
    "fgsm": (lambda m, t, **kw: FGSM(m, t, **kw), Linf),
    "pgd": (lambda m, t, **kw: PGD(m, t, steps=5, restarts=2, **kw), Linf),
    "pgd-targeted": (lambda m, t, **kw: PGD(m, t, steps=5, targeted=True, **kw), Linf),
    "apgd": (lambda m, t, **kw: APGD(m, t, steps=5, **kw), Linf),
    "apgd-t": (lambda m, t, **kw: APGDT(m, t, steps=5, n_target_classes=2, **kw), Linf),
    "square": (lambda m, t, **kw: Square(m, t, queries=30, **kw), Linf),
    "cw": (lambda m, t, **kw: CW(m, t, steps=5, binary_search_steps=2, **kw), L2),
    "deepfool": (lambda m, t, **kw: DeepFool(m, t, steps=5, **kw), Linf),
}
EPS = {Linf: 0.1, L2: 1.0}


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def images(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def bf16_false_alarm_model() -> nn.Module:
    """z0 = 0 and z1 = 0.999·a − b + 3e-4: at a = b = 0.5 float32 gives z1 = −2e-4 (class 0 wins) but bf16 rounds
    0.999 to 1.0 and gives z1 = +3e-4 (class 1 wins). Within eps = 1e-5 float32 never changes its mind."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [0.999, -1.0]]))
        model.bias.copy_(torch.tensor([0.0, 3e-4]))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# amp: the returned points, the re-check, the model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_amp_points_stay_in_ball_and_success_is_rechecked_in_float32(name, amp):
    build, norm = FAMILIES[name]
    model, (x, y) = conv_model(), images()
    threat = norm(eps=EPS[norm])
    result = build(model, threat, seed=0, amp=amp).run(x, y)
    assert result.x_adv.dtype == torch.float32 and result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        exact = model(result.x_adv)
    torch.testing.assert_close(result.logits, exact, rtol=0, atol=1e-5)
    wanted = result.targets if result.targets is not None else y
    fooled = exact.argmax(1) == wanted if result.targets is not None else exact.argmax(1) != wanted
    assert torch.equal(result.success, fooled)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_false_alarm_is_not_reported_as_success(name):
    model = bf16_false_alarm_model()
    x, y = torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert bool((model(x).argmax(1) == 1).all())  # the premise: bf16 alone would call every sample broken
    build, norm = FAMILIES[name]
    result = build(model, norm(eps=1e-5), seed=0, amp="bf16").run(x, y)
    assert not bool(result.success.any())
    if result.targets is None:
        assert torch.equal(result.predictions, y)


def test_bf16_false_alarm_does_not_end_the_attack_early():
    """A low-precision 'success' must not stop the sample's iterations: PGD spends its whole budget."""
    model, x, y = bf16_false_alarm_model(), torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long)
    result = PGD(model, Linf(eps=1e-5), steps=7, amp="bf16").run(x, y)
    assert result.n_grad == 3 * 7
    assert result.n_forward > 0  # the re-checks are counted in the budget


def test_amp_leaves_the_model_untouched():
    model, (x, y) = conv_model(), images(4)
    model.train()
    before = model_state(model)
    APGD(model, Linf(eps=0.1), steps=3, amp="bf16").run(x, y)
    assert_same_state(before, model_state(model))
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# amp=None is the full-precision path, bit for bit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_amp_none_is_bitwise_the_default(name):
    build, norm = FAMILIES[name]
    model, (x, y) = conv_model(), images(6)
    threat = norm(eps=EPS[norm])
    default, explicit = build(model, threat, seed=3).run(x, y), build(model, threat, seed=3, amp=None).run(x, y)
    assert torch.equal(default.x_adv, explicit.x_adv) and torch.equal(default.logits, explicit.logits)
    assert (default.n_grad, default.n_forward) == (explicit.n_grad, explicit.n_forward)


def test_fgsm_without_amp_is_the_float32_closed_form():
    model, (x, y) = conv_model(), images(6)
    x_leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_leaf), y, reduction="sum"), x_leaf)
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    assert torch.equal(FGSM(model, Linf(eps=0.05), amp=None)(x, y), expected)


# ------------------------------------------------------------------------------------------------
# channels_last
# ------------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_points_and_predictions():
    model, (x, y) = conv_model(), images(8)
    threat = L2(eps=1.0)  # normalised gradient steps: no sign() to amplify float dust between layouts
    plain = PGD(model, threat, steps=5, seed=0).run(x, y)
    nhwc_model = prepare_model(copy.deepcopy(model), "cpu", channels_last=True)
    assert nhwc_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    fast = PGD(nhwc_model, threat, steps=5, seed=0, channels_last=True).run(x, y)
    torch.testing.assert_close(fast.x_adv, plain.x_adv, rtol=0, atol=1e-5)
    assert torch.equal(fast.predictions, plain.predictions) and torch.equal(fast.success, plain.success)
    assert fast.x_adv.is_contiguous()  # the caller's layout comes back


def test_channels_last_ignores_inputs_that_are_not_images():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    plain = FGSM(model, Linf(eps=0.1)).run(x, y)
    assert torch.equal(FGSM(model, Linf(eps=0.1), channels_last=True).run(x, y).x_adv, plain.x_adv)


# ------------------------------------------------------------------------------------------------
# Bad values and devices
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["fp8", "float16", True, 16])
def test_unknown_amp_is_a_config_error_naming_the_choices(amp):
    with pytest.raises(ConfigError, match=r"amp: expected one of \('bf16', 'fp16'\)"):
        PGD(conv_model(), Linf(eps=0.1), amp=amp)


def test_amp_accepts_either_case():
    assert resolve_amp("BF16") == torch.bfloat16 and resolve_amp(None) is None


def test_amp_on_a_device_without_autocast_is_a_config_error():
    with pytest.raises(ConfigError, match="amp: 'bf16' autocast is not supported on meta"):
        autocast(torch.device("meta"), torch.bfloat16)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device: expected one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but this torch sees no CUDA device"):
            resolve_device("cuda")


def test_evaluate_suite_with_amp_matches_float32():
    """A suite spec passes ``amp`` through to its attacks; the robust accuracy agrees with float32 here."""
    from gradguard.evaluation import evaluate

    model, (x, y) = conv_model(), images(16)
    suite = [{"name": "apgd-ce", "steps": 5}]
    exact = evaluate(model, (x, y), Linf(eps=0.02), suite, seed=0)
    mixed = evaluate(model, (x, y), Linf(eps=0.02), [{**suite[0], "amp": "bf16"}], seed=0)
    assert abs(exact.robust_accuracy - mixed.robust_accuracy) <= 2 / 16


def test_evaluate_amp_applies_to_every_named_attack_and_a_false_alarm_breaks_nothing():
    """``evaluate(amp=...)`` sets every named attack's precision (a spec's own key wins); on a model whose bf16 logits
    flip the decision, no sample is reported broken because every success is re-checked in float32."""
    from gradguard.evaluation import evaluate, resolve_suite

    specs = resolve_suite(["fgsm", {"name": "pgd", "amp": "fp16"}], amp="bf16")
    assert [s.kwargs["amp"] for s in specs] == ["bf16", "fp16"]
    model = bf16_false_alarm_model()
    x = torch.full((6, 2), 0.5)
    y = model(x).argmax(1)
    report = evaluate(model, (x, y), Linf(eps=1e-5), ["fgsm", {"name": "pgd", "steps": 3}], amp="bf16")
    assert report.clean_accuracy == 1.0 and report.robust_accuracy == 1.0


def test_evaluate_rejects_an_unknown_amp_before_any_work():
    from gradguard.evaluation import evaluate

    with pytest.raises(ConfigError, match="amp"):
        evaluate(conv_model(), images(4), Linf(eps=0.01), "quick", amp="int8")
