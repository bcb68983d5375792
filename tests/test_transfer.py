"""Transfer attacks: crafted on a surrogate, judged on the target; equal to the white-box attack when they match."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import L2, Linf, evaluate
from gradguard.attacks import APGD, MIFGSM, PGD, Transfer
from gradguard.attacks.transfer import InputDiversity
from gradguard.errors import ConfigError, InputError, ModelOutputError

N = 60


@pytest.fixture(scope="module")
def batch(digits):
    return digits.x_test[:N], digits.y_test[:N]


@pytest.fixture(scope="module")
def other_mlp(digits):
    """A different, smaller MLP: the surrogate. A zoo build, so ``save`` can write a run directory of it."""
    from conftest import train_classifier
    from gradguard.models import build_model

    torch.manual_seed(1)
    model = build_model("mlp", depth=1, width=32, input_shape=(1, 8, 8), num_classes=10)
    return train_classifier(model, digits.x_train, digits.y_train, epochs=10, seed=1)


@pytest.mark.parametrize("threat", [Linf(eps=0.1), L2(eps=1.0)], ids=["linf", "l2"])
@pytest.mark.parametrize("kind, white_box", [("pgd", PGD), ("mifgsm", MIFGSM), ("apgd", APGD)])
def test_surrogate_equal_to_target_is_the_white_box_attack(digits_mlp, batch, threat, kind, white_box):
    x, y = batch
    white = white_box(digits_mlp, threat, steps=8, seed=3, restarts=2, early_stop=False).run(x, y)
    transfer = Transfer(digits_mlp, threat, digits_mlp, attack=kind, steps=8, seed=3, restarts=2,
                        early_stop=False).run(x, y)
    assert torch.equal(transfer.x_adv, white.x_adv)
    assert torch.equal(transfer.success, white.success)
    assert transfer.n_grad == white.n_grad  # surrogate gradients: here the same model's


def test_linear_surrogate_reaches_the_closed_form_linf_optimum():
    """Two classes, logits W·x: the L∞-optimal untargeted step is eps·sign(w_other − w_true) on every pixel."""
    torch.manual_seed(0)
    target = nn.Linear(20, 2, bias=False)
    surrogate = nn.Linear(20, 2, bias=False)
    surrogate.load_state_dict(target.state_dict())
    x = 0.3 + 0.4 * torch.rand(16, 20)  # away from the bounds: clipping plays no part
    y = torch.randint(0, 2, (16,))
    eps = 0.05
    result = Transfer(target, Linf(eps=eps), surrogate, attack="mifgsm", steps=10).run(x, y)
    w = target.weight.detach()
    optimum = eps * torch.sign(w[1 - y] - w[y])
    assert torch.allclose(result.x_adv - x, optimum, atol=1e-6)
    assert result.n_grad == 10 * 16 and result.n_forward == 16


@pytest.mark.parametrize("threat", [Linf(eps=0.1), L2(eps=1.0)], ids=["linf", "l2"])
@pytest.mark.parametrize("diversity", [False, 1.0])
def test_points_stay_in_ball_and_bounds_and_success_is_judged_on_the_target(digits_mlp, other_mlp, batch,
                                                                            threat, diversity):
    x, y = batch
    result = Transfer(digits_mlp, threat, other_mlp, steps=5, seed=0, input_diversity=diversity).run(x, y)
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        target_predictions = digits_mlp(result.x_adv).argmax(1)
    assert torch.equal(result.success, target_predictions != y)
    assert 0 < int(result.success.sum()) < N  # some points transfer, not all
    assert result.n_grad == 5 * N and result.n_forward == N


def test_input_diversity_resizes_and_pads_only_while_taking_gradients(digits):
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :10]

    diverse = InputDiversity(Recorder(), prob=1.0)
    diverse.generator = torch.Generator().manual_seed(0)
    x = digits.x_test[:4]
    with torch.no_grad():
        diverse(x)
    assert torch.equal(seen[-1], x)  # scoring passes see the true input
    changed = False
    for _ in range(10):
        with torch.enable_grad():
            diverse(x)
        assert seen[-1].shape == x.shape
        changed |= not torch.equal(seen[-1], x)
    assert changed
    with pytest.raises(ConfigError, match="input_diversity"):
        InputDiversity(Recorder(), prob=1.0).resize_and_pad(torch.rand(3, 64))


def test_target_and_surrogate_untouched(digits_mlp, batch):
    target = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    target[1].weight.requires_grad_(False)
    before = [p.detach().clone() for p in list(target.parameters()) + list(surrogate.parameters())]
    x, y = batch
    Transfer(target, Linf(eps=0.1), surrogate, attack="pgd", steps=3, restarts=2).run(x, y)
    assert target.training and surrogate.training
    assert [p.requires_grad for p in target.parameters()] == [False, True]
    assert all(p.requires_grad for p in surrogate.parameters())
    after = list(target.parameters()) + list(surrogate.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for p in after)


def test_bad_surrogates_and_options_get_one_clear_line(digits_mlp, batch):
    x, y = batch
    threat = Linf(eps=0.1)
    with pytest.raises(InputError, match="^surrogate: expected a torch.nn.Module"):
        Transfer(digits_mlp, threat, 42)
    five_classes = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ModelOutputError, match="^surrogate: returns 5 classes but the target model returns 10"):
        Transfer(digits_mlp, threat, five_classes).run(x, y)
    wrong_input = nn.Sequential(nn.Flatten(), nn.Linear(32, 10))
    with pytest.raises(ModelOutputError, match="^surrogate: fails on the target's inputs") as error:
        Transfer(digits_mlp, threat, wrong_input).run(x, y)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="^attack: expected one of"):
        Transfer(digits_mlp, threat, digits_mlp, attack="square")
    with pytest.raises(ConfigError, match="^attack: an Attack instance must be built on the surrogate"):
        Transfer(digits_mlp, threat, five_classes, attack=PGD(digits_mlp, threat))
    with pytest.raises(ConfigError, match="^attack: the Attack instance has threat"):
        Transfer(digits_mlp, threat, five_classes, attack=PGD(five_classes, Linf(eps=0.3)))
    with pytest.raises(ConfigError, match="^input_diversity"):
        Transfer(digits_mlp, threat, digits_mlp, input_diversity=1.5)


def test_attack_instance_keeps_its_settings_and_state(digits_mlp, other_mlp, batch):
    x, y = batch
    crafter = PGD(other_mlp, Linf(eps=0.1), steps=4, seed=0, early_stop=False)  # used as built
    result = Transfer(digits_mlp, Linf(eps=0.1), other_mlp, attack=crafter, seed=0).run(x, y)
    assert result.n_grad == 4 * N
    assert crafter.generator is None and crafter.model is other_mlp


def test_transfer_as_a_suite_entry_with_a_module_and_a_run_directory(digits_mlp, other_mlp, batch, tmp_path):
    from gradguard.models import save

    x, y = batch
    save(other_mlp, tmp_path / "surrogate")
    by_module, by_spec = (evaluate(digits_mlp, (x, y), Linf(eps=0.1), seed=0, batch_size=32,
                                   suite=[{"name": "transfer", "surrogate": surrogate, "steps": 5}])
                          for surrogate in (other_mlp, str(tmp_path / "surrogate")))
    assert by_module.robust_accuracy == by_spec.robust_accuracy
    assert by_module.clean_accuracy > by_module.robust_accuracy > 0
    assert by_spec.to_dict()["attacks"][0]["surrogate"] == str(tmp_path / "surrogate")
    with pytest.raises(ConfigError, match="needs its surrogate"):
        evaluate(digits_mlp, (x, y), Linf(eps=0.1), suite=["transfer"])
