"""Transfer attacks: craft adversarial examples on a surrogate model, judge them on the target.

The gradients come from the surrogate only; the target is queried once per sample and restart to score the
result (Papernot et al. 2016; Dong et al., CVPR 2018, for MI-FGSM's transferability; Xie et al., CVPR 2019, for
input diversity). A transfer attack needs no gradient of the target at all, so it is an adaptive attack against
defences whose own gradients are useless (randomised, quantised or shattered) while a smooth, undefended copy
of the model still points the way (Athalye, Carlini & Wagner 2018; Tramèr et al. 2020).
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, GradguardError, InputError, ModelOutputError
from ..threat import ThreatModel
from .base import Attack, Iterate, check_logits, model_guard

# The gradient attacks a transfer attack can run on its surrogate, by name.
SURROGATE_ATTACKS = ("mifgsm", "pgd", "apgd")
# Input diversity shrinks the image to a random size in [RESIZE_FLOOR·H, H] and pads it back to H × W.
RESIZE_FLOOR = 0.9


def resolve_surrogate(surrogate: Any, device: torch.device | None = None) -> nn.Module:
    """``surrogate`` as an ``nn.Module``: a module is used as is; a model spec string (run directory,
    ``.safetensors``, zoo name, ``package.module:callable``) is built by ``gradguard.models.resolve`` on ``device``."""
    if isinstance(surrogate, nn.Module):
        return surrogate
    if isinstance(surrogate, (str, os.PathLike)):
        from ..models import resolve

        try:
            return resolve(surrogate, map_location=device or "cpu").eval()
        except GradguardError as error:
            raise type(error)(f"surrogate: cannot build {str(surrogate)!r}: {error}") from None
    raise InputError(f"surrogate: expected a torch.nn.Module or a model spec string (run directory, .safetensors, "
                     f"package.module:callable), got {type(surrogate).__name__}")


class InputDiversity(nn.Module):
    """DI²-FGSM's random resize-and-pad in front of ``model`` (Xie et al., CVPR 2019), with probability ``prob``.

    Applied only while gradients are being taken, so the surrogate's forward-only scoring sees the true input.
    The image is shrunk (nearest neighbour) to a random size in [0.9·H, H] × [0.9·W, W] and zero-padded back to
    H × W at a random offset; one draw per batch and gradient step. The paper enlarges 299 → [299, 330) and feeds
    a 330-pixel model; shrinking keeps the input size, so any fixed-size model works.
    """

    def __init__(self, model: nn.Module, prob: float) -> None:
        super().__init__()
        self.model, self.prob = model, prob
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self._uniform() < self.prob:
            x = self.resize_and_pad(x)
        return self.model(x)

    def resize_and_pad(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"input_diversity: needs image batches (batch, C, H, W), got shape {tuple(x.shape)}; "
                              "use input_diversity=False for other inputs")
        height, width = x.shape[-2:]
        new_h, new_w = (int(self._randint(max(1, int(RESIZE_FLOOR * size)), size + 1)) for size in (height, width))
        small = F.interpolate(x, size=(new_h, new_w), mode="nearest")
        top, left = int(self._randint(0, height - new_h + 1)), int(self._randint(0, width - new_w + 1))
        return F.pad(small, (left, width - new_w - left, top, height - new_h - top))

    def _uniform(self) -> float:
        device = self.generator.device if self.generator is not None else "cpu"
        return float(torch.rand(1, generator=self.generator, device=device))

    def _randint(self, low: int, high: int) -> int:
        device = self.generator.device if self.generator is not None else "cpu"
        return int(torch.randint(low, high, (1,), generator=self.generator, device=device))


class Transfer(Attack):
    """Craft with a gradient attack on ``surrogate``, score the points on the target ``model``.

    ``attack``: ``"mifgsm"`` (default: momentum transfers best, Dong et al. 2018), ``"pgd"``, ``"apgd"``, or an
    ``Attack`` built on the surrogate (used as is). ``input_diversity``: ``False`` or the probability p of DI²-FGSM's
    random resize-and-pad at each surrogate gradient step (Xie et al. 2019 use p = 0.5). Other keyword arguments
    (``steps``, ``step_size``, ``decay``...) go to the surrogate attack; ``loss``, ``targeted``, ``seed`` and ``amp``
    to both. The surrogate attack runs its full budget on every sample (a point that fools the surrogate is pushed
    further, since transfer needs margin); ``early_stop`` and ``restarts`` act on the target: a later restart
    attacks only the samples the target still classifies correctly.

    ``success`` is judged on the target; ``n_grad`` counts surrogate gradients, ``n_forward`` target queries.
    With the surrogate equal to the target it is the white-box attack with ``early_stop=False``.
    """

    name = "transfer"

    def __init__(self, model: nn.Module, threat: ThreatModel, surrogate: nn.Module | str | os.PathLike, *,
                 attack: str | Attack = "mifgsm", input_diversity: bool | float = False, **attack_kwargs: Any) -> None:
        shared = {key: attack_kwargs.pop(key) for key in ("loss", "targeted", "target_policy", "restarts",
                                                           "early_stop", "seed", "amp", "channels_last")
                  if key in attack_kwargs}
        super().__init__(model, threat, **shared)
        parameter = next(model.parameters(), None)
        self.surrogate = resolve_surrogate(surrogate, parameter.device if parameter is not None else None)
        self.input_diversity = _diversity_probability(input_diversity)
        self.surrogate_attack = self._surrogate_attack(attack, shared, attack_kwargs)
        self._crafting_model = (InputDiversity(self.surrogate, self.input_diversity) if self.input_diversity
                                else self.surrogate)

    def _surrogate_attack(self, attack: str | Attack, shared: dict, attack_kwargs: dict) -> Attack:
        if isinstance(attack, Attack):
            if attack_kwargs:
                raise ConfigError(f"attack: an Attack instance takes no extra keyword arguments, got "
                                  f"{sorted(attack_kwargs)}; set them when building it")
            if attack.model is not self.surrogate:
                raise ConfigError("attack: an Attack instance must be built on the surrogate, e.g. "
                                  "PGD(surrogate, threat, ...)")
            if attack.threat.to_dict() != self.threat.to_dict() or attack.targeted != self.targeted:
                raise ConfigError(f"attack: the Attack instance has threat {attack.threat!r}, targeted="
                                  f"{attack.targeted} but the transfer attack {self.threat!r}, targeted={self.targeted}; "
                                  "build both with the same threat model and targeting")
            return attack
        if not isinstance(attack, str) or attack.lower() not in SURROGATE_ATTACKS:
            raise ConfigError(f"attack: expected one of {SURROGATE_ATTACKS} or an Attack built on the surrogate, "
                              f"got {attack!r}")
        from .apgd import APGD
        from .mifgsm import MIFGSM
        from .pgd import PGD

        kinds: dict[str, type[Attack]] = {"mifgsm": MIFGSM, "pgd": PGD, "apgd": APGD}
        inner = {key: value for key, value in shared.items() if key not in ("restarts", "early_stop")}
        try:
            return kinds[attack.lower()](self.surrogate, self.threat, **inner, **attack_kwargs, early_stop=False)
        except TypeError as error:
            raise ConfigError(f"attack: cannot build {attack!r} on the surrogate with {attack_kwargs}: {error}") from None

    # -- the algorithm ------------------------------------------------------------------------------
    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        """One restart: the surrogate attack's point; the base class scores it on the target."""
        crafter = copy.copy(self.surrogate_attack)  # the caller's Attack object keeps its own state
        crafter.model, crafter.generator = self._crafting_model, self.generator
        crafter._n_grad = crafter._n_forward = 0
        if isinstance(self._crafting_model, InputDiversity):
            self._crafting_model.generator = self.generator
        with model_guard(self._crafting_model):
            found = crafter._perturb(x, labels)
        self._n_grad += crafter._n_grad
        return Iterate(found.x_adv.detach())

    # -- contract checks on the surrogate -----------------------------------------------------------
    @torch.no_grad()
    def _probe_num_classes(self, x: Tensor) -> int:
        num_classes = super()._probe_num_classes(x)
        with model_guard(self.surrogate):
            try:
                logits = check_logits(self.surrogate(x[:1]), 1, "surrogate")
            except RuntimeError as error:  # a shape mismatch inside the surrogate's layers
                raise ModelOutputError(f"surrogate: fails on the target's inputs {tuple(x.shape[1:])}: "
                                       f"{str(error).splitlines()[0]}; use a surrogate for the same input shape") from None
        if logits.shape[1] != num_classes:
            raise ModelOutputError(f"surrogate: returns {logits.shape[1]} classes but the target model returns "
                                   f"{num_classes}; use a surrogate trained on the same classes")
        return num_classes

    def validate_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = super().validate_inputs(x, y)
        parameter = next(self.surrogate.parameters(), None)
        if parameter is not None and parameter.device != x.device:
            raise InputError(f"surrogate: is on {parameter.device} but x is on {x.device}; move it, e.g. "
                             f"surrogate.to({str(x.device)!r})")
        return x, y

    def __repr__(self) -> str:
        diversity = f", input_diversity={self.input_diversity}" if self.input_diversity else ""
        return (f"Transfer(threat={self.threat!r}, surrogate={type(self.surrogate).__name__}, "
                f"attack={self.surrogate_attack!r}{diversity}, restarts={self.restarts})")


def _diversity_probability(value: Any) -> float:
    if value is False or value is None:
        return 0.0
    if value is True:
        return 0.5  # Xie et al. (2019)'s p
    try:
        prob = float(value)
    except (TypeError, ValueError):
        prob = -1.0
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"input_diversity: expected False, True (p = 0.5) or a probability in [0, 1], got {value!r}")
    return prob
