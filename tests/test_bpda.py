"""BPDA (Athalye et al., ICML 2018): a non-differentiable preprocessing step attacked through a stand-in gradient."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gradguard import Linf
from gradguard.attacks import APGD, BPDA, Square
from gradguard.errors import InputError, ShapeError
from gradguard.evaluation import evaluate


def quantise(x: Tensor) -> Tensor:
    """3-bit input quantisation, round(x·8)/8: its gradient is zero almost everywhere."""
    return torch.round(x * 8) / 8


class Quantise(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return quantise(x)


@pytest.fixture(autouse=True)
def one_thread():
    """A 64-input MLP: a second thread only adds synchronisation (and waits on a busy CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bpda_pgd_breaks_input_quantisation_at_least_as_well_as_square(digits, digits_mlp):
    x, y = digits.x_test[:120], digits.y_test[:120]
    threat = Linf(eps=0.1)
    defended = nn.Sequential(Quantise(), digits_mlp)
    with torch.no_grad():
        clean = float((defended(x).argmax(1) == y).float().mean())
    assert clean > 0.9
    plain = APGD(defended, threat, steps=50, seed=0).run(x, y).accuracy  # zero gradients: nothing to follow
    square = Square(defended, threat, queries=500, seed=0).run(x, y).accuracy  # needs no gradient
    through = evaluate(nn.Sequential(BPDA(quantise), digits_mlp), (x, y), threat, suite="quick", seed=0)
    assert clean - plain < 0.05, (clean, plain)
    assert clean - square > 0.3, (clean, square)  # the defence itself is weak: a gradient-free attack shows it
    assert through.robust_accuracy <= square, (through.robust_accuracy, square)


def test_forward_is_the_preprocessing_exactly_and_backward_the_approximation():
    x = torch.rand(5, 7, requires_grad=True)
    straight = BPDA(quantise)
    out = straight(x)
    assert torch.equal(out, quantise(x.detach()))  # bit for bit: still on the 1/8 lattice
    (grad,) = torch.autograd.grad((out * torch.arange(7.0)).sum(), x)
    assert torch.equal(grad, torch.arange(7.0).expand(5, 7))  # identity: the incoming gradient passes through
    squared = BPDA(quantise, approx=lambda v: v ** 2)
    (grad,) = torch.autograd.grad(squared(x).sum(), x)
    assert torch.allclose(grad, 2 * x.detach())  # d(x²)/dx at the same input, not at the quantised one
    with torch.no_grad():
        assert torch.equal(squared(x), quantise(x))


def test_bad_approximations_and_preprocessing_get_one_clear_line():
    x = torch.rand(4, 6, requires_grad=True)
    wrong_shape = BPDA(quantise, approx=lambda v: v[:, :3])
    with pytest.raises(ShapeError, match=r"^approx: returns \(4, 3\) but preprocess returns \(4, 6\)") as error:
        torch.autograd.grad(wrong_shape(x).sum(), x)
    assert "\n" not in str(error.value)
    with pytest.raises(ShapeError, match="^preprocess: changes the shape .* pass approx="):
        BPDA(lambda v: v[:, :3])(x)
    with pytest.raises(InputError, match="^approx: expected a differentiable callable"):
        BPDA(quantise, approx="identity")
    with pytest.raises(InputError, match="^preprocess: expected a callable"):
        BPDA(None)
