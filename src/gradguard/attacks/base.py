"""The attack base class: validation, targets, restarts, early stop, best iterates, budget and amp re-checks.

An attack subclass implements one method, ``_perturb(x, labels) -> Iterate``, for one restart on one batch.
Everything else — argument checks, eval mode, targets, restarts, early stop, keeping the per-sample best
point, budget counting, mixed precision and memory layout — lives here once.

The pieces it is built from live below it and are re-exported here, because ``gradguard.attacks.base`` is the
documented path: the device, amp and compile runtime (``gradguard.runtime``), the model guard, the one gradient
primitive and the checked logits (``gradguard.core``), the argument checks (``gradguard.checks``) and the result
types (``attacks/result.py``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import BOUNDS_TOLERANCE as BOUNDS_TOLERANCE  # the argument checks, re-exported from their old home
from ..checks import as_labels, check_inputs, check_labels, positive_int
from ..checks import positive_float as positive_float
from ..core.gradient import Objective as Objective  # the gradient layer, re-exported from its old home
from ..core.gradient import input_gradient
from ..core.guard import model_guard
from ..core.logits import check_logits, forward_logits, voted_logits
from ..errors import ConfigError, InputError
from ..runtime.compile import CompiledModel as CompiledModel  # the runtime, likewise
from ..runtime.compile import CompileFallbackWarning as CompileFallbackWarning
from ..runtime.compile import compiled_model
from ..runtime.device import DEVICES as DEVICES
from ..runtime.device import prepare_model as prepare_model
from ..runtime.device import resolve_device as resolve_device
from ..runtime.device import to_layout
from ..runtime.precision import AMP_DTYPES as AMP_DTYPES
from ..runtime.precision import FP16_LOSS_SCALE as FP16_LOSS_SCALE
from ..runtime.precision import autocast, resolve_amp
from ..runtime.precision import upcast_logits as upcast_logits
from ..threat import ThreatModel, check_threat
from .losses import LossSpec, resolve_objective
from .result import AttackResult, BestIterate, Iterate
from .result import any_per_owner as any_per_owner  # the result types, likewise
from .result import expand_mask as expand_mask

TARGET_POLICIES = ("random", "least-likely")


# ------------------------------------------------------------------------------------------------
# The attack base class
# ------------------------------------------------------------------------------------------------
class Attack:
    """Base class of every attack.

    Args:
        model: a classifier returning (batch, classes) logits; inputs are in pixel space (see ``Normalized``).
        threat: the ``ThreatModel`` (norm, eps, bounds) every returned point respects.
        loss: "ce", "dlr", "margin" (CW) or a callable ``fn(logits, labels) -> (batch,)`` to increase.
        targeted: aim for target classes (given to ``run(..., target=)`` or chosen by ``target_policy``).
        target_policy: "random" (a uniformly drawn wrong class) or "least-likely" (lowest clean logit).
        restarts: independent runs; the per-sample best is kept.
        early_stop: stop working on samples once they succeed (the returned point then is the first
            successful one). Turn off to maximise the loss, e.g. for adversarial training.
        seed: fixes random starts and random targets; None uses torch's global RNG.
        amp: None (full precision), "bf16" or "fp16": the gradient primitive and the forward-only queries run
            under ``torch.autocast``; the adversarial points stay in ``x``'s dtype, and every success ``run``
            reports is re-checked by a full-precision forward pass (a low-precision logit never counts a sample
            as broken). bf16 is the safe choice; fp16 scales the loss against gradient underflow.
        channels_last: run on 4-D image batches in the channels_last (NHWC) layout, faster for convolutions on
            GPUs when the model is in that layout too (``prepare_model``). Returned points keep ``x``'s layout.
        compile: run the attack's gradients and queries through ``torch.compile(model)``. Off by default: on the
            CPU benchmarks it made a PreActResNet-18's passes 2–3× faster after a minute of compiling but a small
            CNN's gradient 1.3× slower (bench/results/suite-stages.md). If compiling fails, the model runs eagerly with one
            ``CompileFallbackWarning``; the results are the same either way up to float rounding.
        eot_samples: for randomised models, Expectation over Transformation (Athalye et al., ICML 2018): every
            gradient is the mean over this many passes (``input_gradient``); the budget counts each pass.
        success_votes: for randomised models, a sample counts as broken only when the majority of this many
            forward passes say so: every success the attack acts on (early stop, best point) and reports.

    ``attack(x, y)`` returns the adversarial tensor; ``attack.run(x, y)`` returns an ``AttackResult``.
    """

    name: ClassVar[str] = "attack"
    uses_random_start: ClassVar[bool] = False
    supported_norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        loss: LossSpec = "ce",
        targeted: bool = False,
        target_policy: str = "random",
        restarts: int = 1,
        early_stop: bool = True,
        seed: int | None = None,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        eot_samples: int = 1,
        success_votes: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        check_threat(threat)
        if target_policy not in TARGET_POLICIES:
            raise ConfigError(f"target_policy: expected one of {TARGET_POLICIES}, got {target_policy!r}")
        self.model = model
        self.threat = threat
        self.loss = loss
        self.objective = resolve_objective(loss)
        self.targeted = bool(targeted)
        self.target_policy = target_policy
        self.restarts = positive_int(restarts, "restarts")
        self.early_stop = bool(early_stop)
        self.seed = seed
        self.amp = None if amp is None else str(amp).lower()
        self.amp_dtype = resolve_amp(amp)
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        # What the attack's gradients and queries call: the model, or its compiled form (see CompiledModel).
        self.forward_model: Any = compiled_model(model) if self.compile else model
        self.eot_samples = positive_int(eot_samples, "eot_samples")
        self.success_votes = positive_int(success_votes, "success_votes")
        self.generator: torch.Generator | None = None
        self._n_grad = 0
        self._n_forward = 0
        norms = self.supported_norms  # each attack lists the norms it works under; the others are refused here, once
        if threat.norm not in norms:
            raise ConfigError(f"threat: {type(self).__name__} supports the norms {norms}, got a {threat.norm!r} "
                              f"threat model; use one of " + ", ".join(n.capitalize() if n != "linf" else "Linf" for n in norms))

    # -- public API ---------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """Adversarial examples for ``x`` with labels ``y``: a tensor of ``x``'s shape.

        Computes only what the tensor needs: a single-restart attack skips the final scoring forward pass
        that ``run`` spends on the result's logits and success mask.
        """
        return self._run(x, y, target, scored=False).x_adv

    def run(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> AttackResult:
        """Attack a batch and return an ``AttackResult`` (best point per sample over restarts)."""
        return self._run(x, y, target, scored=True)

    def _run(self, x: Tensor, y: Tensor, target: Tensor | None, scored: bool) -> AttackResult:
        x, y = self.validate_inputs(x, y)
        if not (self.channels_last and x.dim() == 4):
            return self._attack_batch(x, y, target, scored)
        restore = x.is_contiguous()
        result = self._attack_batch(to_layout(x, True), y, target, scored)
        if restore:
            result.x_adv = result.x_adv.contiguous()  # hand back the caller's layout
        return result

    def _attack_batch(self, x: Tensor, y: Tensor, target: Tensor | None, scored: bool) -> AttackResult:
        """Restarts, per-sample best and the full-precision re-check around ``_perturb``, on validated inputs."""
        self._n_grad = self._n_forward = 0
        self.generator = self._make_generator(x.device)
        autocast(x.device, self.amp_dtype)  # an unsupported amp fails here, before any work
        with model_guard(self.model):
            if x.shape[0] == 0:
                return self._empty_result(x, y)
            num_classes = self._probe_num_classes(x)
            check_labels(y, num_classes, "y")
            labels = self._attack_labels(x, y, target, num_classes)
            if not scored and self.restarts == 1:
                return AttackResult(self._perturb(x, labels).x_adv, *self._unscored(x, y, labels))
            best = BestIterate(x)
            for _ in range(self.restarts):
                index = None
                if self.early_stop and best.logits is not None:
                    index = (~best.success).nonzero().squeeze(1)
                    if index.numel() == 0:
                        break
                xs, ls = (x, labels) if index is None else (x[index], labels[index])
                found = self._perturb(xs, ls)
                logits, objective = found.logits, found.objective
                if logits is None or objective is None:
                    logits, objective = self._evaluate(found.x_adv, ls, full_precision=True)
                elif self.amp_dtype is not None:  # the full-precision re-check of what run() reports
                    logits = self._full_precision_logits(found.x_adv)
                if self.success_votes > 1:  # a randomised model: the majority of the votes decides
                    success, logits = self._voted(found.x_adv, ls)
                else:
                    success = self._succeeded(logits, ls)
                best.update(found.x_adv, logits, objective, success, index)
        assert best.logits is not None  # the first restart always offers every sample
        return AttackResult(
            x_adv=best.x_adv,
            success=best.success,
            logits=best.logits,
            loss=best.objective,
            labels=y,
            targets=labels if self.targeted else None,
            n_grad=self._n_grad,
            n_forward=self._n_forward,
            success_votes=self.success_votes,
        )

    # -- what subclasses implement ------------------------------------------------------------------
    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        """One restart on one batch. ``labels`` are true labels (untargeted) or targets (targeted)."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------------------------------
    def _gradient(self, x_adv: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(gradient of the objective w.r.t. ``x_adv``, logits, objective); counts the budget."""
        self._n_grad += x_adv.shape[0] * self.eot_samples
        grad, logits, objective = input_gradient(self.forward_model, x_adv, labels, self.objective, self.targeted,
                                                 amp=self.amp_dtype, eot_samples=self.eot_samples)
        if self.amp_dtype is not None or self.success_votes > 1:
            logits, objective = self._confirm_claims(x_adv, labels, logits, objective)
        return grad, logits, objective

    @torch.no_grad()
    def _evaluate(self, x_adv: Tensor, labels: Tensor, full_precision: bool = False) -> tuple[Tensor, Tensor]:
        """(logits, objective) at ``x_adv`` without gradients; counts the budget.

        Runs under the attack's ``amp`` unless ``full_precision`` (the re-check of what ``run`` reports).
        """
        self._n_forward += x_adv.shape[0]
        amp = None if full_precision else self.amp_dtype
        logits = forward_logits(self.forward_model, x_adv, amp)
        objective = self.objective(logits, labels, self.targeted)
        if amp is not None or self.success_votes > 1:
            logits, objective = self._confirm_claims(x_adv, labels, logits, objective)
        return logits, objective

    @torch.no_grad()
    def _confirm_claims(self, x_adv: Tensor, labels: Tensor, logits: Tensor,
                        objective: Tensor) -> tuple[Tensor, Tensor]:
        """Under amp: rows whose low-precision logits claim a success get float32 logits and objective instead.

        So every decision taken on a success — early stop, the best iterate — rests on a full-precision logit;
        a low-precision false alarm leaves the sample in play. Costs one forward pass on the claiming rows only.
        With ``success_votes`` > 1 the claim stands only if the majority of that many passes agrees (the rows get
        the logits of a pass that agrees with the verdict; the objective, an EOT mean, is kept).
        """
        claimed = self._claims_success(logits, labels)
        if not bool(claimed.any()):
            return logits, objective
        rows = claimed.nonzero().squeeze(1)
        logits = logits.clone()
        if self.success_votes > 1:
            logits[rows] = self._voted(x_adv[rows], labels[rows])[1].to(logits.dtype)
            return logits, objective
        exact = self._full_precision_logits(x_adv[rows])
        objective = objective.clone()
        logits[rows] = exact
        objective[rows] = self.objective(exact, labels[rows], self.targeted).to(objective.dtype)
        return logits, objective

    def _voted(self, x_adv: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(success, logits) by the majority of ``success_votes`` full-precision passes; counts the budget."""
        self._n_forward += x_adv.shape[0] * self.success_votes
        return voted_logits(self.model, x_adv, labels, self.success_votes, self._claims_success)

    def _claims_success(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels.dim() == 2:  # (true class, target) pairs: a targeted objective steering an untargeted attack
            return logits.argmax(dim=1) != labels[:, 0]
        return self._succeeded(logits, labels)

    @torch.no_grad()
    def _full_precision_logits(self, x_adv: Tensor) -> Tensor:
        """Checked float32 logits at ``x_adv`` with autocast off; counts the budget."""
        self._n_forward += x_adv.shape[0]
        return forward_logits(self.forward_model, x_adv, None)

    @torch.no_grad()
    def _forward(self, x: Tensor) -> Tensor:
        """Checked logits at ``x`` under the attack's ``amp``, for subclasses' own queries (budget not counted)."""
        return forward_logits(self.forward_model, x, self.amp_dtype)

    def _succeeded(self, logits: Tensor, labels: Tensor) -> Tensor:
        predictions = logits.argmax(dim=1)
        return predictions == labels if self.targeted else predictions != labels

    def _random_start(self, x: Tensor) -> Tensor:
        return self.threat.random_start(x, self.generator)

    # -- internals ----------------------------------------------------------------------------------
    def _make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.seed))
        return generator

    @torch.no_grad()
    def _probe_num_classes(self, x: Tensor) -> int:
        """One-sample forward: checks the model's output contract before any real work."""
        return check_logits(self.model(x[:1]), 1).shape[1]

    def _attack_labels(self, x: Tensor, y: Tensor, target: Tensor | None, num_classes: int) -> Tensor:
        if not self.targeted:
            if target is not None:
                raise InputError("target: given to an untargeted attack; construct the attack with targeted=True")
            return y
        if target is not None:
            target = as_labels(target, x.shape[0], "target")
            check_labels(target, num_classes, "target")
            return target
        if self.target_policy == "least-likely":
            logits, _ = self._evaluate(x, y)
            return logits.argmin(dim=1)
        offset = torch.randint(1, num_classes, y.shape, generator=self.generator, device=y.device)
        return (y + offset) % num_classes

    def validate_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Check ``x`` and ``y`` against the contract; returns them detached (``y`` as int64)."""
        x = check_inputs(x, self.threat)
        y = as_labels(y, x.shape[0], "y")
        parameter = next(self.model.parameters(), None)
        if parameter is not None and parameter.device != x.device:
            raise InputError(
                f"x: is on {x.device} but the model is on {parameter.device}; move one, e.g. x.to({str(parameter.device)!r})"
            )
        return x, y

    def _unscored(self, x: Tensor, y: Tensor, labels: Tensor) -> tuple:
        """Placeholder fields for the tensor-only path of ``__call__`` (never shown to users)."""
        nothing = torch.empty(0, device=x.device)
        return (nothing, nothing, nothing, y, labels if self.targeted else None, self._n_grad, self._n_forward)

    def _empty_result(self, x: Tensor, y: Tensor) -> AttackResult:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return AttackResult(x.clone(), empty, torch.zeros(0, 0, device=x.device), torch.zeros(0, device=x.device),
                            y, None, 0, 0)

    def __repr__(self) -> str:
        extra = f", amp={self.amp!r}" if self.amp is not None else ""
        extra += f", eot_samples={self.eot_samples}" if self.eot_samples > 1 else ""
        extra += f", success_votes={self.success_votes}" if self.success_votes > 1 else ""
        return (f"{type(self).__name__}(threat={self.threat!r}, loss={self.loss!r}, targeted={self.targeted}, "
                f"restarts={self.restarts}{extra})")
