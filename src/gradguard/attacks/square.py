"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search")."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..threat import ThreatModel
from .base import Attack, BestIterate, Iterate, expand_mask

# Iterations (on the paper's 10 000-query scale) after which the square's area fraction p halves.
P_HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_TINY = 1e-12


def square_p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The paper's schedule: p_init halved at iterations 10, 50, 200, ..., 8000, rescaled from 10 000 to ``queries``."""
    rescaled = int(iteration / queries * 10000)
    return p_init / 2 ** sum(rescaled > point for point in P_HALVING_POINTS)


class Square(Attack):
    """Score-based black-box random search: change a random square window per iteration, keep the change only if
    the margin loss improves. Uses the model's logits only — no gradients (``n_grad`` stays 0); every model call
    is counted in ``n_forward``.

    Paper defaults: 5000 queries, p_init = 0.8 (the window covers a fraction p of the pixels, p halving on the
    schedule of ``square_p_schedule``), margin loss (max_{i≠y} z_i − z_y to increase). L∞: vertical-stripe init,
    windows set to ±eps per channel. L2: a grid of pseudo-Gaussian bumps as init, each step moves the mass of a
    second window into the first, keeping ‖δ‖₂ = eps. Samples stop once they succeed. Inputs of any shape:
    (batch, C, H, W) is used as an image, (batch, H, W) as one channel, anything else flattened to a 1 × D row.
    """

    name = "square"
    supported_norms = ("linf", "l2")

    def __init__(self, model: nn.Module, threat: ThreatModel, *, queries: int = 5000, p_init: float = 0.8,
                 loss="margin", schedule_queries: int | None = None, **kwargs) -> None:
        super().__init__(model, threat, loss=loss, **kwargs)
        self.queries = positive_int(queries, "queries")
        self.p_init = positive_float(p_init, "p_init")
        if self.p_init > 1:
            raise ConfigError(f"p_init: a fraction of the pixels in (0, 1], got {p_init!r}; the paper uses 0.8")
        # the budget p's schedule is laid out for: ``queries`` (the paper's rescaling) by default; AutoAttack's
        # "standard" lays it out for 10 000 and stops at 5 000, so its windows stay large twice as long
        self.schedule_queries = self.queries if schedule_queries is None else positive_int(
            schedule_queries, "schedule_queries")

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        shape = x.shape
        image = _as_image(x)
        init = self._linf_init if self.threat.norm == "linf" else self._l2_init
        current = self.threat.project(init(image).reshape(shape), x)
        logits, loss = self._evaluate(current, labels)
        best = BestIterate(x)
        success = self._succeeded(logits, labels)
        best.update(current, logits, loss, success)
        index = torch.arange(x.shape[0], device=x.device)
        current = _as_image(current)
        step = self._linf_step if self.threat.norm == "linf" else self._l2_step
        for iteration in range(1, self.queries):
            if self.early_stop and bool(success.any()):
                keep = ~success
                if not bool(keep.any()):
                    return Iterate(best.x_adv, best.logits, best.objective)
                index, image, current, loss, logits, labels = (
                    t[keep] for t in (index, image, current, loss, logits, labels))
            p = square_p_schedule(self.p_init, iteration, self.schedule_queries)
            candidate = step(image, current, p)
            new_logits, new_loss = self._evaluate(candidate.reshape((-1,) + shape[1:]), labels)
            success = self._succeeded(new_logits, labels)
            if bool(success.any()):  # a success is offered at once; the rest is offered once, at the end
                best.update(candidate[success].reshape((-1,) + shape[1:]), new_logits[success], new_loss[success],
                            success[success], index[success])
            improved = new_loss > loss
            current = torch.where(expand_mask(improved, current), candidate, current)
            logits = torch.where(improved[:, None], new_logits, logits)
            loss = torch.where(improved, new_loss, loss)
        # The accepted point only changes when the loss rises, so it is each sample's highest-loss query:
        # its best point unless a success (offered above) beats it.
        best.update(current.reshape((-1,) + shape[1:]), logits, loss, self._succeeded(logits, labels), index)
        return Iterate(best.x_adv, best.logits, best.objective)

    # -- L∞ ---------------------------------------------------------------------------------------
    def _linf_init(self, image: Tensor) -> Tensor:
        n, c, _, w = image.shape
        return image + self.threat.eps * self._signs((n, c, 1, w), image)

    def _linf_step(self, image: Tensor, current: Tensor, p: float) -> Tensor:
        """``current`` with one window set to x ± eps per channel: inside the ball by construction, so only the
        window needs the box clamp (no full projection per query)."""
        n, c, h, w = image.shape
        rows, cols, top, left = self._window(h, w, p, minimum=1)
        proposal = current.clone()
        window = (slice(None), slice(None), slice(top, top + rows), slice(left, left + cols))
        proposal[window] = (image[window] + self.threat.eps * self._signs((n, c, 1, 1), image)).clamp_(
            *self.threat.bounds)
        return proposal

    # -- L2 ---------------------------------------------------------------------------------------
    def _l2_init(self, image: Tensor) -> Tensor:
        n, c, h, w = image.shape
        tile_h, tile_w = max(h // 5, 1), max(w // 5, 1)
        delta = torch.zeros_like(image)
        for top in range(0, h - tile_h + 1, tile_h):
            for left in range(0, w - tile_w + 1, tile_w):
                bump = _pseudo_gaussian(tile_h, tile_w, image, self.generator)
                delta[:, :, top:top + tile_h, left:left + tile_w] += bump * self._signs((n, c, 1, 1), image)
        return image + self._rescale(delta, self.threat.eps)

    def _l2_step(self, image: Tensor, current: Tensor, p: float) -> Tensor:
        """Move the perturbation's mass from window 2 (zeroed) into window 1 (a new bump plus its old content)."""
        n, c, h, w = image.shape
        delta = current - image
        rows, cols, top, left = self._window(h, w, p, minimum=3)
        _, _, top2, left2 = self._window(h, w, p, minimum=3)
        first = (slice(None), slice(None), slice(top, top + rows), slice(left, left + cols))
        second = (slice(None), slice(None), slice(top2, top2 + rows), slice(left2, left2 + cols))
        union = torch.zeros_like(delta[:1, :1])
        union[first] = 1
        union[second] = 1
        union_norm = _channel_norm(delta * union)  # (n, c, 1, 1)
        image_norm_sq = delta.flatten(1).pow(2).sum(dim=1).reshape(-1, 1, 1, 1)
        old = delta[first] / (_channel_norm(delta[first]) + 1e-10)
        new = _pseudo_gaussian(rows, cols, image, self.generator) * self._signs((n, c, 1, 1), image) + old
        budget = ((self.threat.eps ** 2 - image_norm_sq).clamp_min(0) / c + union_norm ** 2).sqrt()
        new = new / (_channel_norm(new) + _TINY) * budget
        delta = delta.clone()
        delta[second] = 0
        delta[first] = new
        moved = image + self._rescale(delta, self.threat.eps)
        return self.threat.project(moved, image)  # per-sample norms: the (n, C, H, W) view is the same ball

    # -- shared pieces ----------------------------------------------------------------------------
    def _window(self, h: int, w: int, p: float, minimum: int) -> tuple[int, int, int, int]:
        """A window of about p·h·w pixels (square where the image allows) at a random position."""
        side = max(int(round(math.sqrt(p * h * w))), minimum)
        if side <= min(h, w):
            rows = cols = side
        else:  # a thin image: keep the area with a rectangle
            rows = min(side, h)
            cols = min(w, max(minimum, int(round(p * h * w / rows))))
        top = int(torch.randint(0, h - rows + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, w - cols + 1, (1,), generator=self.generator))
        return rows, cols, top, left

    def _signs(self, shape: tuple, like: Tensor) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=self.generator, device=self._generator_device(like))
        return (bits * 2 - 1).to(device=like.device, dtype=like.dtype)

    def _generator_device(self, like: Tensor) -> torch.device:
        return self.generator.device if self.generator is not None else like.device

    @staticmethod
    def _rescale(delta: Tensor, eps: float) -> Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(_TINY)
        return delta * expand_mask(eps / norms, delta)


def _as_image(x: Tensor) -> Tensor:
    """(batch, C, H, W) view of ``x``: images stay images, (batch, H, W) gets a channel, the rest a 1 × D row."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], 1, 1, -1)


def _channel_norm(t: Tensor) -> Tensor:
    return t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()


def _pseudo_gaussian(rows: int, cols: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The paper's L2 update pattern: two halves of concentric-rectangle bumps (weights 1/(k+1)² summed over the
    rings k that contain a pixel) with opposite signs, unit L2 norm, randomly transposed when square."""
    def bump(r: int, s: int) -> Tensor:
        if r == 0:
            return torch.zeros(0, s, dtype=like.dtype, device=like.device)
        i = torch.arange(r, device=like.device).reshape(-1, 1)
        j = torch.arange(s, device=like.device).reshape(1, -1)
        ring = torch.maximum((i - r // 2).abs(), (j - s // 2).abs())
        n_rings = max(r // 2, s // 2) + 1
        weights = torch.tensor([1.0 / (k + 1) ** 2 for k in range(n_rings)], dtype=like.dtype, device=like.device)
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1/(k+1)^2
        return tail[ring]

    pattern = torch.cat([bump(rows // 2, cols), -bump(rows - rows // 2, cols)], dim=0)
    pattern = pattern / pattern.norm().clamp_min(_TINY)
    if rows == cols and bool(torch.rand(1, generator=generator) > 0.5):
        pattern = pattern.t()
    return pattern
