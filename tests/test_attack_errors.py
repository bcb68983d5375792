"""Every bad input gets a GradguardError subclass whose message names the argument."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import BoundsError, ConfigError, GradguardError, InputError, Linf, ModelOutputError, ShapeError
from gradguard.attacks import BIM, FGSM, MIFGSM, PGD


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


X = torch.rand(4, 1, 4, 4)
Y = torch.tensor([0, 1, 2, 0])


class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        return self.fn(self.linear(x.flatten(1)))


@pytest.mark.parametrize(
    "x,y,error,argument",
    [
        (torch.rand(4), Y, ShapeError, "x"),  # no batch dimension
        ((X * 255).to(torch.uint8), Y, InputError, "x"),  # non-float dtype
        (X.masked_fill(torch.zeros_like(X, dtype=torch.bool).index_fill_(0, torch.tensor([1]), True), float("nan")),
         Y, BoundsError, "x"),
        (X + torch.tensor(float("inf")) * (X > 0.99), Y, BoundsError, "x"),
        (X * 2.0 + 0.5, Y, BoundsError, "x"),  # outside the bounds (0, 1)
        (X - 1.0, Y, BoundsError, "x"),
        (X, Y[:3], ShapeError, "y"),  # wrong length
        (X, Y[:, None], ShapeError, "y"),  # wrong shape
        (X, Y.float(), InputError, "y"),  # non-integer labels
        (X, torch.tensor([0, 1, 3, 0]), InputError, "y"),  # out of range for 3 classes
        (X, torch.tensor([0, -1, 2, 0]), InputError, "y"),
        ([[0.5]], Y, InputError, "x"),  # not a tensor
        (X, [0, 1, 2, 0], InputError, "y"),
    ],
)
@pytest.mark.parametrize("attack", [FGSM, PGD, BIM, MIFGSM])
def test_bad_inputs_raise_named_errors(model, attack, x, y, error, argument):
    with pytest.raises(error, match=rf"^{argument}:"):
        attack(model, Linf(eps=0.1))(x, y)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_is_rejected(eps):
    with pytest.raises(ConfigError, match="^eps:"):
        Linf(eps=eps)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_are_rejected(model, steps):
    with pytest.raises(ConfigError, match="^steps:"):
        PGD(model, Linf(eps=0.1), steps=steps)


@pytest.mark.parametrize(
    "kwargs,argument",
    [({"restarts": 0}, "restarts"), ({"loss": "hinge"}, "loss"), ({"target_policy": "nearest"}, "target_policy"),
     ({"step_size": -1.0}, "step_size"), ({"init": "gauss"}, "init")],
)
def test_bad_options_are_rejected(model, kwargs, argument):
    with pytest.raises(ConfigError, match=f"^{argument}:"):
        PGD(model, Linf(eps=0.1), **kwargs)


def test_threat_and_model_types_are_checked(model):
    with pytest.raises(InputError, match="^threat:"):
        PGD(model, 0.1)
    with pytest.raises(InputError, match="^model:"):
        PGD(lambda x: x, Linf(eps=0.1))


def test_the_base_class_refuses_a_norm_the_attack_does_not_list(model):
    """A new attack declares ``supported_norms`` and gets the check from ``Attack.__init__``, with the same
    message the strong attacks give (it used to be each attack's own call to a private apgd helper)."""
    from gradguard import L2
    from gradguard.attacks import Attack, Iterate

    class OnlyL2(Attack):
        supported_norms = ("l2",)

        def _perturb(self, x, labels):
            return Iterate(x)

    with pytest.raises(ConfigError, match=r"^threat: OnlyL2 supports the norms \('l2',\), got a 'linf' threat "
                                          r"model; use one of L2$"):
        OnlyL2(model, Linf(eps=0.1))
    OnlyL2(model, L2(eps=0.5))  # a listed norm is accepted


@pytest.mark.parametrize(
    "fn",
    [
        lambda z: z.sum(dim=1),  # (batch,) not (batch, classes)
        lambda z: z[:, :, None],  # 3-D
        lambda z: z[:1],  # wrong batch
        lambda z: z * float("nan"),  # non-finite
        lambda z: (z, z),  # not a tensor
    ],
)
def test_bad_model_output_is_rejected(fn):
    with pytest.raises(ModelOutputError, match="^model:"):
        PGD(Returns(fn), Linf(eps=0.1), steps=2)(X, Y)


def test_target_given_to_untargeted_attack_is_rejected(model):
    with pytest.raises(InputError, match="^target:"):
        PGD(model, Linf(eps=0.1)).run(X, Y, target=Y)
    with pytest.raises(InputError, match="^target:"):
        PGD(model, Linf(eps=0.1), targeted=True).run(X, Y, target=torch.tensor([5, 0, 0, 0]))


def test_callable_loss_must_be_per_sample(model):
    with pytest.raises(ConfigError, match="^loss:"):
        PGD(model, Linf(eps=0.1), loss=lambda logits, y: nn.functional.cross_entropy(logits, y))(X, Y)
    per_sample = PGD(model, Linf(eps=0.1), steps=2, loss=lambda logits, y: nn.functional.cross_entropy(
        logits, y, reduction="none"))(X, Y)
    assert per_sample.shape == X.shape


def test_all_errors_share_one_base_class():
    for error in (InputError, ShapeError, BoundsError, ModelOutputError, ConfigError):
        assert issubclass(error, GradguardError)
