"""The attack base: validation, the model guard, the one gradient primitive, restarts and best iterates.

An attack subclass implements one method, ``_perturb(x, labels) -> Iterate``, for one restart on one batch.
Everything else — argument checks, eval mode, targets, restarts, early stop, keeping the per-sample best
point, budget counting, mixed precision and memory layout — lives here once.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Iterator

import torch
from torch import Tensor, nn

from ..checks import BOUNDS_TOLERANCE as BOUNDS_TOLERANCE  # the argument checks, re-exported from their old home
from ..checks import as_labels, check_inputs, check_labels, positive_int
from ..checks import positive_float as positive_float
from ..errors import ConfigError, InputError, ModelOutputError
from ..threat import ThreatModel, check_threat
from .losses import LossSpec, Objective, resolve_objective

TARGET_POLICIES = ("random", "least-likely")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# fp16 has 5 exponent bits: small input gradients underflow to zero unless the loss is scaled up first.
FP16_LOSS_SCALE = 2.0 ** 10


# ------------------------------------------------------------------------------------------------
# Devices, memory layout and mixed precision
# ------------------------------------------------------------------------------------------------
def resolve_amp(amp: str | None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` ("bf16", "fp16" or None for full precision)."""
    if amp is None:
        return None
    if not isinstance(amp, str) or amp.lower() not in AMP_DTYPES:
        raise ConfigError(f"amp: expected one of {tuple(AMP_DTYPES)} or None (full precision), got {amp!r}")
    return AMP_DTYPES[amp.lower()]


_AUTOCAST_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    """``torch.autocast`` for ``device``'s type at ``dtype``; a no-op for ``dtype=None``.

    Raises ConfigError where torch would silently disable autocast (an unsupported device or dtype), so a
    requested ``amp`` never quietly runs in full precision.
    """
    if dtype is None:
        return contextlib.nullcontext()
    key = (device.type, dtype)
    if key not in _AUTOCAST_CHECKED:
        _AUTOCAST_CHECKED[key] = _autocast_works(device.type, dtype)
    if not _AUTOCAST_CHECKED[key]:
        raise ConfigError(f"amp: {_amp_name(dtype)!r} autocast is not supported on {device.type} by torch "
                          f"{torch.__version__}; use amp='bf16' or amp=None there")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _amp_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in AMP_DTYPES.items()}.get(dtype, str(dtype))


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    if not torch.amp.is_autocast_available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns, then disables autocast, for an unsupported dtype
        try:
            with torch.autocast(device_type=device_type, dtype=dtype):
                pass
        except (UserWarning, RuntimeError):
            return False
    return True


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``."""
    if isinstance(device, torch.device):
        spec = str(device)
    elif device is None:
        spec = "auto"
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ConfigError(f"device: expected one of {DEVICES} (or 'cuda:N'), got {device!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.split(":")[0] not in DEVICES[1:]:
        raise ConfigError(f"device: expected one of {DEVICES} (or 'cuda:N'), got {device!r}")
    try:
        resolved = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: cannot parse {device!r}; use 'cuda', 'cuda:0' or 'cpu'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but this torch sees no CUDA device; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                              "exist; use a smaller index")
    return resolved


def prepare_model(model: nn.Module, device: str | torch.device | None = "auto", *,
                  channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` (see ``resolve_device``) and, with ``channels_last``, to the NHWC memory
    layout that tensor-core convolutions prefer. Changes ``model`` in place and returns it.

    This is the one place that changes a model's storage; attacks never do. Values are unchanged, so results
    agree with the default layout up to float rounding. Pair it with ``Attack(..., channels_last=True)``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model.to(resolve_device(device))
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` in the channels_last layout when asked for and ``x`` is a 4-D image batch; else ``x`` as is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def upcast_logits(logits: Tensor) -> Tensor:
    """Low-precision (fp16/bf16) logits cast up to float32; anything else unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a model; gradguard runs it eagerly instead (same results, no speed-up)."""


class CompiledModel:
    """``model`` through ``torch.compile``, falling back to the eager model (one warning) if compiling fails.

    Compilation happens at the first call, so that is where a failure surfaces (no C++ compiler, an operation
    the compiler does not support, an old Python); any exception there or later switches this wrapper to the
    eager model for good, and the call is repeated eagerly, so an error of the model itself still surfaces from
    the eager call. One wrapper per model (``compiled_model``) so a model warns once, not once per attack.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled: Any = None
        try:
            self.compiled = torch.compile(model)
        except Exception as error:  # torch.compile itself refuses (e.g. an unsupported Python)
            self._fall_back(error)

    def __call__(self, x: Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as error:
                self._fall_back(error)
        return self.model(x)

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        warnings.warn(f"compile: torch.compile failed for {type(self.model).__name__} ({type(error).__name__}: "
                      f"{reason}); running the model eagerly instead (same results, no speed-up). Pass compile=False "
                      "(CLI: drop --compile) to silence this.", CompileFallbackWarning, stacklevel=3)


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, CompiledModel]" = weakref.WeakKeyDictionary()


def compiled_model(model: nn.Module) -> CompiledModel:
    """The one ``CompiledModel`` of ``model`` (created on first use; compiled code is reused by every attack)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledModel(model)
    return _COMPILED[model]


# ------------------------------------------------------------------------------------------------
# The model guard and the one gradient primitive
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration; exact restore afterwards, also on error.

    Freezing parameters is not only hygiene: autograd then keeps no activations for weight gradients,
    which saves memory in every attack. ``.grad`` fields are never touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def check_logits(logits: Any, batch: int, argument: str = "model", amp: torch.dtype | None = None) -> Tensor:
    """The logits in a model's output, checked: a finite (batch, classes) float tensor, else ModelOutputError.

    An output that is not a tensor goes through the output adapter (``gradguard.models.select_logits``): its
    ``logits`` attribute or key is used (a Hugging Face ``ModelOutput``, a dict); any other output is refused with
    a message that says how to select the logits (``--logits``, ``gradguard.models.Logits``)."""
    if not isinstance(logits, Tensor):
        from ..models.outputs import select_logits

        logits = select_logits(logits)
    if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < 2:
        raise ModelOutputError(
            f"{argument}: expected (batch={batch}, classes>=2) logits, got shape {tuple(logits.shape)}; "
            "flatten or wrap the model's output"
        )
    if not bool(torch.isfinite(logits).all()):
        if amp is not None:
            raise ModelOutputError(
                f"{argument}: the model returned NaN or inf logits under amp={_amp_name(amp)!r}; its activations "
                "overflow in low precision: use amp='bf16' (fp16 overflows above 65504) or amp=None"
            )
        raise ModelOutputError(
            f"{argument}: the model returned NaN or inf logits; check its weights and input normalisation"
        )
    return logits


def forward_logits(model: Callable[[Tensor], Any], x: Tensor, amp: torch.dtype | None = None) -> Tensor:
    """Checked logits of ``model`` at ``x``, under autocast at ``amp`` when given (then cast up to float32)."""
    if amp is None:
        return check_logits(model(x), x.shape[0])
    with autocast(x.device, amp):
        logits = model(x)
    return upcast_logits(check_logits(logits, x.shape[0], amp=amp))


def input_gradient(model: Callable[[Tensor], Any], x: Tensor, labels: Tensor, objective: Objective, targeted: bool,
                   amp: torch.dtype | None = None, eot_samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The one gradient primitive: (d objective / d x, logits, per-sample objective) in one pass.

    Gradients are taken w.r.t. the input only (``torch.autograd.grad``), never accumulated into parameters.
    With ``amp`` (torch.bfloat16 or torch.float16) the model's forward and backward run under autocast; the
    logits are cast up to float32 before the objective, and the gradient comes back in ``x``'s dtype. fp16 scales
    the loss against gradient underflow and falls back to full precision if the scaled gradient overflows.

    ``eot_samples=k`` > 1 is Expectation over Transformation (Athalye et al., ICML 2018) for randomised models:
    k passes, each with the model's own fresh randomness, and the mean of their gradients, logits and objectives
    (the gradient of the mean objective, i.e. a k-sample estimate of the expected objective's gradient).
    """
    if eot_samples > 1:
        return _eot_gradient(model, x, labels, objective, targeted, amp, eot_samples)
    if amp is None:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = check_logits(model(x), x.shape[0])
            values = objective(logits, labels, targeted)
            (grad,) = torch.autograd.grad(values.sum(), x)
        return grad, logits.detach(), values.detach()
    scale = FP16_LOSS_SCALE if amp == torch.float16 else 1.0
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        with autocast(x.device, amp):
            logits = model(x_leaf)
        logits = upcast_logits(check_logits(logits, x.shape[0], amp=amp))
        values = objective(logits, labels, targeted)
        (grad,) = torch.autograd.grad(values.sum() * scale if scale != 1.0 else values.sum(), x_leaf)
    if scale != 1.0:
        grad = grad / scale
        if not bool(torch.isfinite(grad).all()):
            full_grad, _, _ = input_gradient(model, x, labels, objective, targeted, amp=None)
            grad = full_grad
    return grad, logits.detach(), values.detach()


def _eot_gradient(model: Callable[[Tensor], Any], x: Tensor, labels: Tensor, objective: Objective, targeted: bool,
                  amp: torch.dtype | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The mean of ``k`` single-pass gradients, logits and objectives.

    One pass at a time, not one k-fold batch: a model that draws one transformation per batch (a random resize,
    a random crop) must get k independent draws, and memory stays that of a single pass.
    """
    grad, logits, values = input_gradient(model, x, labels, objective, targeted, amp)
    for _ in range(k - 1):
        more = input_gradient(model, x, labels, objective, targeted, amp)
        grad, logits, values = grad + more[0], logits + more[1], values + more[2]
    return grad / k, logits / k, values / k


@torch.no_grad()
def voted_logits(model: nn.Module, x: Tensor, labels: Tensor, votes: int,
                 succeeded: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(success, logits): the majority verdict of ``votes`` forward passes of a randomised model at ``x``.

    A sample succeeds when more than half of the passes say ``succeeded(logits, labels)``. Its logits are those
    of one pass that agrees with the verdict, so ``argmax`` and ``success`` never contradict each other.
    """
    if votes == 1:
        logits = check_logits(model(x), x.shape[0])
        return succeeded(logits, labels), upcast_logits(logits)
    passes = [check_logits(model(x), x.shape[0]) for _ in range(votes)]
    verdicts = torch.stack([succeeded(logits, labels) for logits in passes])  # (votes, batch)
    success = 2 * verdicts.sum(0) > votes
    agree = verdicts == success[None]  # at least one pass agrees with the majority, always
    first = agree.int().argmax(0)
    chosen = torch.stack(passes)[first, torch.arange(x.shape[0], device=x.device)]
    return success, upcast_logits(chosen)


# ------------------------------------------------------------------------------------------------
# Results and the per-sample best-iterate tracker
# ------------------------------------------------------------------------------------------------
@dataclass
class Iterate:
    """What one restart of an attack returns; ``logits``/``objective`` may be unknown (None)."""

    x_adv: Tensor
    logits: Tensor | None = None
    objective: Tensor | None = None


@dataclass
class AttackResult:
    """The outcome of ``Attack.run``.

    ``success`` is per sample: misclassified (untargeted) or classified as the target (targeted).
    ``loss`` is the attack objective at ``x_adv`` (higher is stronger). ``n_grad`` counts per-sample
    gradient evaluations and ``n_forward`` per-sample forward-only evaluations, the attack's budget (with EOT,
    k per gradient). ``success_votes`` is the number of forward passes whose majority judged ``success`` (1 for a
    deterministic model).
    """

    x_adv: Tensor
    success: Tensor
    logits: Tensor
    loss: Tensor
    labels: Tensor
    targets: Tensor | None
    n_grad: int
    n_forward: int
    success_votes: int = 1

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(dim=1)

    @property
    def correct(self) -> Tensor:
        """Per sample: is ``x_adv`` still classified as its true label."""
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        """Accuracy of the model on ``x_adv`` (robust accuracy for an untargeted attack)."""
        return float(self.correct.float().mean()) if self.labels.numel() else float("nan")


class BestIterate:
    """Keeps, per sample, the best point seen: a success beats a failure, then the higher objective.

    It may keep references to the tensors offered to ``update`` instead of copies: do not modify those
    in place afterwards (the attack loops build a new iterate every step).
    """

    def __init__(self, x: Tensor):
        n = x.shape[0]
        self.x_adv = x.detach().clone()
        self.objective = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.logits: Tensor | None = None

    def update(self, x_adv: Tensor, logits: Tensor, objective: Tensor, success: Tensor, index: Tensor | None = None) -> None:
        """Offer candidates for all samples (``index=None``) or for the samples at ``index``."""
        if self.logits is None:
            self.logits = torch.zeros(self.x_adv.shape[0], logits.shape[1], device=logits.device, dtype=logits.dtype)
        if index is None:
            better = self._better(success, objective, self.success, self.objective)
            if bool(better.all()):  # common while the loss still climbs: no copy needed
                self.x_adv, self.logits = x_adv.detach(), logits
            else:
                self.x_adv = torch.where(expand_mask(better, x_adv), x_adv.detach(), self.x_adv)
                self.logits = torch.where(better[:, None], logits, self.logits)
            self.objective = torch.where(better, objective, self.objective)
            self.success = self.success | success
            return
        better = self._better(success, objective, self.success[index], self.objective[index])
        chosen = index[better]
        self.x_adv[chosen] = x_adv[better].detach()
        self.logits[chosen] = logits[better]
        self.objective[chosen] = objective[better]
        self.success[chosen] = success[better]

    @staticmethod
    def _better(success: Tensor, objective: Tensor, best_success: Tensor, best_objective: Tensor) -> Tensor:
        return (success & ~best_success) | ((success == best_success) & (objective > best_objective))


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample mask shaped to broadcast over ``like``'s (batch, ...) dimensions."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


def any_per_owner(success: Tensor, owner: Tensor, n_owners: int | None = None) -> Tensor:
    """Per row: has any row with the same owner succeeded (rows that are copies of one sample).

    ``n_owners`` bounds the owner ids (default: the row count, right while no row has been dropped); passing it
    avoids reading ``owner.max()`` back from the device."""
    hit = torch.zeros(owner.shape[0] if n_owners is None else n_owners, dtype=torch.bool, device=owner.device)
    hit[owner[success]] = True
    return hit[owner]


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
