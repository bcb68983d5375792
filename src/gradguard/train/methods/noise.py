"""Gaussian noise augmentation (Cohen et al. 2019): the base classifier that randomized smoothing certifies."""
from __future__ import annotations

from torch.nn import functional as F

from ...checks import positive_float
from ...rng import noise_like
from ...threat import ThreatModel
from .base import MethodOutput, TrainingMethod


class Gaussian(TrainingMethod):
    """Gaussian noise augmentation (Cohen, Rosenfeld & Kolter, ICML 2019): L = CE(f(x + δ), y), δ ~ N(0, σ²I),
    one fresh draw per sample and step — the base classifier that ``gradguard.certify`` smooths at the same σ.

    As in the paper the noisy input is *not* clamped to the pixel range: certification adds unclamped noise, and
    the model should be trained on that distribution. No threat model is needed; the noise comes from torch's
    global RNG, which the Trainer seeds and checkpoints. The "robust" training accuracy it reports is the accuracy
    on the noisy inputs it trains on.
    """

    name = "gaussian"
    needs_threat = False

    def __init__(self, threat: ThreatModel | None = None, *, sigma: float = 0.25) -> None:
        super().__init__(threat)
        self.sigma = positive_float(sigma, "sigma")

    def state_dict(self):
        return {"sigma": self.sigma}

    def compute(self, model, attack_model, x, y, threat):
        logits_noisy = model(x + self.sigma * noise_like(x))
        return MethodOutput(F.cross_entropy(logits_noisy, y), logits_adv=logits_noisy)
