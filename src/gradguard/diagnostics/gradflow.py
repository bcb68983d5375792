"""Gradient health while training: per-layer gradient, weight and update norms, dead and saturated units.

``GradientMonitor`` watches a model through hooks only. Every ``every``-th training step it records, for each
parameterised module ("layer"):

- ``grad_norm`` / ``grad_max``: L2 norm and max |g| of the layer's parameter gradients, as the optimiser sees
  them (after any clipping, which is what moves the weights);
- ``weight_norm`` and ``update_ratio`` = ‖Δθ‖ / ‖θ‖ across the optimiser step;
- activation statistics of the layer's output as it passes through the next activation module:
  ``dead_fraction`` (ReLU units never positive over the sampled batch) and ``saturated_fraction``
  (sigmoid/tanh outputs where the local derivative is below 5 % of its maximum).

The model's hooks are registered just before a sampled step and removed after it, so the other steps run
exactly as without the monitor (only ``step()``, or the optimiser's step hook, counts). ``findings()`` turns
the records into ``Finding`` objects (vanishing, exploding, dead, saturated, stalled) with the numbers behind
them and the usual fix. The thresholds, measured on the demo models in ``bench/diagnostics_calibration.py``,
live in ``diagnostics/health.py`` (shared with the plots); the measured values are listed in docs/diagnose.md.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, InputError
from .curvature import LossFn, SharpnessTracker
from .health import (
    DEAD_FRACTION,
    EXPLODING_BEFORE_OVERFLOW,
    EXPLODING_GROWTH,
    EXPLODING_JUMP,
    FATAL_KINDS,
    INPUT_RMS_LIMIT,
    LR_HIGH_RATIO,
    LR_LOW_LOSS_CHANGE,
    LR_LOW_RATIO,
    NOT_LEARNING_DIVERGED,
    NOT_LEARNING_GROWTH,
    NOT_LEARNING_RATIO,
    RECENT_SAMPLES,
    SATURATED_FRACTION,
    SATURATION_DERIVATIVE,
    STALLED_FACTOR,
    START_SAMPLES,
    VANISHING_DROP,
    VANISHING_RATIO,
    layer_order,
)
from .plots import plot_all

KINDS = ("nonfinite", "exploding", "lr_too_high", "not_learning", "vanishing", "stalled", "lr_too_low", "dead", "saturated",
         "inputs_not_normalised", "sharpness", "unrecorded")
WHOLE_MODEL = "(whole model)"

ADVICE = {
    "nonfinite": (
        "The loss or the gradients became NaN/inf, and every update from here on is garbage. Check the data "
        "(torch.isfinite(x).all()), guard logs and divisions with an epsilon (log(p + 1e-12), x / (n + 1e-12)), "
        "lower the learning rate and clip gradients by norm (Trainer(clip_grad_norm=1.0)); under float16 "
        "autocast use torch.amp.GradScaler, which skips the steps whose gradients overflow."
    ),
    "lr_too_high": (
        "Each update moves the weights by more than a tenth of their size (a healthy run sits near 1e-3), so "
        "training jumps around instead of descending. Lower the learning rate 10x, add a warm-up, or clip "
        "gradients by norm."
    ),
    "lr_too_low": (
        "The weights barely move (updates below one millionth of their size) and the loss does not change: "
        "the learning rate is too small to train. Raise it (typical: 1e-3 for Adam, 1e-2 to 1e-1 for SGD), "
        "or check that the schedule does not start at zero."
    ),
    "not_learning": (
        "The loss has not fallen: it sits at or above both where it started and the chance level ln(C) (what a "
        "model guessing uniformly over C classes scores), after a gradient spike or clearly above them (diverged), "
        "so the model is learning nothing. "
        "The usual cause is a learning rate too high for the model (a step that threw it off, from which it "
        "never recovered): lower it 10x, add warm-up, or clip gradients by norm (Trainer(clip_grad_norm=1.0))."
    ),
    "inputs_not_normalised": (
        "The inputs reaching the first layer are large (pixels left in 0-255?), which inflates the first "
        "layer's activations and gradients and makes learning-rate choice fragile. Scale them to [0, 1] "
        "(x / 255) or standardise them ((x - mean) / std per channel, e.g. gradguard.models.normalise)."
    ),
    "unrecorded": (
        "The monitor recorded no training step, so it has nothing to diagnose: this is not an all-clear. Pass "
        "the optimiser (GradientMonitor(model, optimizer=opt)) so steps are counted automatically, or call "
        "monitor.step() after every optimizer.step(); and keep the monitor attached (`with` or attach()) while "
        "training runs."
    ),
    "vanishing": (
        "Gradients shrink on their way to the early layers, so those layers barely learn. Use a ReLU-family "
        "activation (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh, He init (nn.init.kaiming_normal_) for "
        "ReLU or Glorot init (nn.init.xavier_uniform_) for tanh, add normalisation layers (BatchNorm/LayerNorm), "
        "or residual connections so gradients have a short path back."
    ),
    "exploding": (
        "Gradient norms grow or jump (or turn NaN/inf), so updates overshoot. Clip gradients by norm "
        "(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), or Trainer(clip_grad_norm=1.0)), lower the "
        "learning rate (try 10x lower), and use He/Glorot init and normalisation layers to keep scales stable."
    ),
    "dead": (
        "These ReLU units output zero for every input, so they get no gradient and never recover. Initialise "
        "biases at zero with He init, lower the learning rate, add normalisation before the activation, or use "
        "LeakyReLU/GELU, which keep a gradient for negative inputs."
    ),
    "saturated": (
        "These sigmoid/tanh units sit at their asymptotes, where the derivative is ~0 and gradients vanish. "
        "Scale the init down (Glorot: nn.init.xavier_uniform_), normalise the inputs or add normalisation "
        "layers, or switch to a ReLU-family activation."
    ),
    "stalled": (
        "This layer's weights barely move compared with the rest of the model. Check that it is not frozen "
        "and that its learning rate is not tiny; if the layer is early in the network this is usually vanishing "
        "gradients: use ReLU-family activations, He/Glorot init, normalisation layers or residual connections "
        "(an adaptive optimiser such as Adam also evens out per-layer step sizes)."
    ),
    "sharpness": (
        "The loss Hessian's top eigenvalue is past the optimiser's stability threshold (lr·λ_max > 2 for SGD), "
        "so steps overshoot along the sharpest direction and the run is heading for divergence. Lower the "
        "learning rate (below 2/λ_max), add warm-up, or clip gradients by norm."
    ),
}

RELU_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
SIGMOID_TYPES: tuple[type, ...] = (nn.Sigmoid,)
TANH_TYPES: tuple[type, ...] = (nn.Tanh,)
# Where the derivative drops below SATURATION_DERIVATIVE of its maximum:
# sigmoid: s(1-s) < 0.05·0.25  <=>  min(s, 1-s) < (1 - sqrt(1 - 0.05)) / 2;   tanh: 1 - t² < 0.05.
SIGMOID_MARGIN = (1.0 - math.sqrt(1.0 - SATURATION_DERIVATIVE)) / 2.0
TANH_LIMIT = math.sqrt(1.0 - SATURATION_DERIVATIVE)


class GradientHealthWarning(RuntimeWarning):
    """Warned by ``GradientMonitor(on_finding="warn")`` (and "stop", for findings that are not fatal)."""


class TrainingStopped(RuntimeError):
    """Raised by ``GradientMonitor(on_finding="stop")`` at a fatal finding (``FATAL_KINDS``); ``.finding`` says why."""

    def __init__(self, finding: "Finding", step: int):
        self.finding, self.step = finding, step
        super().__init__(f"GradientMonitor stopped training at step {step}: {finding.kind} in {finding.layer} "
                         f"({finding.numbers(limit=4)}). "
                         f"{finding.advice}")


@dataclass
class Finding:
    """One diagnosis: what (``kind``), where (``layer``), the numbers behind it and the usual fix."""

    kind: str
    layer: str
    evidence: dict = field(default_factory=dict)
    advice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def numbers(self, limit: int | None = None) -> str:
        """The evidence (its first ``limit`` items) as ``key=value, ...``, floats to 3 significant digits."""
        items = list(self.evidence.items())[:limit]
        return ", ".join(f"{key}={_short(value)}" for key, value in items)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.layer}: {self.numbers()}\n  advice: {self.advice}"


# ------------------------------------------------------------------------------------------------
# The monitor
# ------------------------------------------------------------------------------------------------
class _LayerState:
    """Per-layer scratch space for the sampled step in progress."""

    __slots__ = ("name", "index", "module", "params", "ever_positive", "activation", "saturated", "elements",
                 "forward_index", "input_stats", "leaf")

    def __init__(self, name: str, index: int, module: nn.Module, params: list[nn.Parameter]):
        self.name, self.index, self.module, self.params = name, index, module, params
        # A container that owns parameters directly (a ViT's position embedding on the root module,
        # nn.MultiheadAttention's in_proj_weight) is entered before its children but may use its parameters
        # anywhere inside: it has no place in the depth order.
        self.leaf = not any(True for child in module.children() for _ in child.parameters())
        self.reset()

    def reset(self) -> None:
        self.ever_positive: Tensor | None = None
        self.activation: str | None = None
        self.saturated: Tensor | int = 0
        self.elements = 0
        self.forward_index: int | None = None  # position among the layers the sampled forward ran
        self.input_stats: Tensor | None = None  # first layer only: [sum of squares, count, max |x|] of its input


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor L2 norms in one fused call where torch has it (as clip_grad_norm_ does)."""
    if not tensors:
        return []
    if hasattr(torch, "_foreach_norm"):
        return list(torch._foreach_norm(tensors, 2.0))
    return [torch.linalg.vector_norm(t) for t in tensors]


def _abs_maxima(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor max |x| (NaN if any element is NaN), as max(max x, -min x): one pass per tensor and no temporary,
    several times cheaper on CPU than the inf-norm kernel (``_foreach_norm(..., inf)``) or abs() + max()."""
    if not tensors:
        return []
    pairs = [torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(())) for t in tensors]
    if len({(t.dtype, t.device) for t in tensors}) == 1:
        lows, highs = torch.stack([low for low, _ in pairs]), torch.stack([high for _, high in pairs])
        return list(torch.maximum(highs, lows.neg()).unbind())
    return [torch.maximum(high, low.neg()) for low, high in pairs]


def _input_stats(x: Tensor) -> Tensor:
    """[sum of squares, element count, max |x|] of a batch in float32, without a temporary of the batch's size
    (a dot product and aminmax instead of square() and abs())."""
    flat = x.reshape(-1)
    flat = flat if flat.dtype == torch.float32 else flat.float()
    low, high = torch.aminmax(flat)
    return torch.stack([torch.dot(flat, flat), torch.tensor(float(flat.numel()), device=flat.device),
                        torch.maximum(high, low.neg())])


def _read_back(tensors: list[Tensor]) -> list[float]:
    """Scalar tensors as Python floats in one host sync: stack each run of same dtype and device, cast once."""
    if not tensors:
        return []
    kinds = [(t.dtype, t.device) for t in tensors]
    device = kinds[0][1]
    parts, start = [], 0
    for end in range(1, len(tensors) + 1):
        if end == len(tensors) or kinds[end] != kinds[start]:
            run = torch.stack(tensors[start:end])
            parts.append(run.to(device=device, dtype=torch.float64))
            start = end
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()


def _subtract_(a: list[Tensor], b: list[Tensor]) -> None:
    """a -= b, element-wise per tensor, in place (one fused call where torch has it)."""
    if not a:
        return
    if hasattr(torch, "_foreach_sub_"):
        torch._foreach_sub_(a, b)
    else:
        for x, y in zip(a, b, strict=True):
            x.sub_(y)


def _engine_callback_queue() -> Callable[[Callable[[], None]], None] | None:
    """The autograd engine's "run this when the current backward pass ends" (as DDP uses), if available."""
    engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
    return getattr(engine, "queue_callback", None)


_queue_backward_callback = _engine_callback_queue()


class GradientMonitor:
    """Per-layer gradient health of a model while it trains, through hooks only.

    Args:
        model: the model being trained; it is never modified (hooks are removed on ``detach``).
        every: sample one training step in ``every`` (steps 0, every, 2·every, ...).
        path: optional ``gradflow.jsonl``; the records of each sampled step are appended as JSON lines.
        optimizer: optional; when given, steps are counted automatically through its step hooks
            (explicit ``step()`` calls then do nothing, so a Trainer calling ``step()`` too is harmless).
        append: append to an existing ``path`` (resumed runs) instead of starting it afresh.
        curvature_every: every N-th step, also measure the top Hessian eigenvalue of that step's training
            batch (``curvature_iters`` warm-started power-iteration products) against the optimiser's stability
            threshold (2/lr for SGD; see ``SharpnessTracker``); a "sharpness" finding when it is exceeded.
            Needs ``optimizer=`` or ``lr=``; labels come from ``step(targets=...)``, else the predictions.
        on_finding: what to do when a finding first appears (checked after every sampled step): None (only
            collect), "warn" (a ``GradientHealthWarning``), "stop" (raise ``TrainingStopped`` at a fatal finding,
            ``FATAL_KINDS`` = nonfinite, exploding; warn at the others) or a callable ``action(finding)``. With an
            action set, a NaN/inf loss passed to ``step(loss)`` is acted on at once (one host sync per step).
        distributed: under DistributedDataParallel, also combine the activation statistics, the first layer's
            input statistics and the loss over all processes, so every rank's records equal a single process's
            on the whole batch (gradients are all-reduced by DDP already). Every rank must then run the monitor.
            Default: on when ``model`` is a DistributedDataParallel and a process group is initialised.

    Use as ``with GradientMonitor(model, every=10, optimizer=opt) as monitor: ...`` (or call ``monitor.step()``
    after each optimiser step instead of passing ``optimizer=``), or hand it to ``Trainer(monitor=...)``. A
    monitor that was never attached attaches itself at its first ``step()`` (recording from the next sampled step
    on). A monitor that recorded nothing says so (a warning and an "unrecorded" finding), never an all-clear.

    The model's hooks are registered only for the sampled steps: ``step()`` arms them when the next step is
    sampled and the end of that step removes them, so the other steps run the model exactly as without the
    monitor (the optimiser's step hooks, when used, only count).
    """

    def __init__(self, model: nn.Module, every: int = 10, path: str | os.PathLike | None = None,
                 optimizer: torch.optim.Optimizer | None = None, *, append: bool = False,
                 curvature_every: int | None = None, curvature_iters: int = 5, lr: float | None = None,
                 curvature_loss: LossFn | None = None, on_finding: str | Callable[[Finding], Any] | None = None,
                 distributed: bool | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not (on_finding is None or callable(on_finding) or on_finding in ("warn", "stop")):
            raise ConfigError(f"on_finding: expected None, 'warn', 'stop' or a callable taking a Finding, "
                              f"got {on_finding!r}")
        is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if is_ddp:
            model = model.module  # type: ignore[assignment]  # hook the wrapped model: same layer names as a single process
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every: expected a positive integer (sample one step in `every`), got {every!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.model = model
        self.on_finding = on_finding
        self.distributed = (is_ddp and torch.distributed.is_available() and torch.distributed.is_initialized()
                            if distributed is None else bool(distributed))
        self.actions: list[dict] = []  # what on_finding did: step, kind, layer, action
        self._acted: set = set()
        self.every = every
        self.path = Path(path) if path is not None else None
        self.optimizer = optimizer
        self.append = append
        self.records: list[dict] = []
        self.step_count = 0  # training steps completed while attached
        self.sampling = False  # is the step in progress sampled (model hooks armed)?
        self.attached = False
        self._ever_attached = False
        self._layers = self._find_layers(model)
        self._by_module = {id(state.module): state for state in self._layers}
        self._params = [p for state in self._layers for p in state.params]
        self._param_position = {id(p): i for i, p in enumerate(self._params)}
        owner = [state.index for state in self._layers for _ in state.params]
        self._positions = [[i for i, o in enumerate(owner) if o == layer] for layer in range(len(self._layers))]
        self._activations = [m for m in model.modules() if isinstance(m, RELU_TYPES + SIGMOID_TYPES + TANH_TYPES)]
        self._optimizer_handles: list[Any] = []
        self._sample_handles: list[Any] = []
        self._snapshot_buffers: list[Tensor] | None = None  # reused by every sample's weight snapshot
        self._file: IO[str] | None = None
        self._reset_sample()
        self._loss: Tensor | float | None = None  # the latest loss passed to step()
        self._output_width: int | None = None  # C of the model's (batch, C) training output, once seen
        self._bad_loss_step: Tensor | int = -1  # first step since the last sample whose loss was NaN/inf
        self._warned_no_grad = self._warned_unrecorded = False
        self.sharpness = (SharpnessTracker(model, curvature_every, optimizer=optimizer, lr=lr, iters=curvature_iters,
                                           loss_fn=curvature_loss) if curvature_every is not None else None)
        self._batch_handle: Any = None
        self._batch: Tensor | None = None  # the sampled step's training input, for the curvature measurement
        self._targets: Tensor | None = None

    @staticmethod
    def _find_layers(model: nn.Module) -> list[_LayerState]:
        layers: list[_LayerState] = []
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                layers.append(_LayerState(name or type(module).__name__, len(layers), module, params))
        if not layers:
            raise InputError("model: it has no trainable parameters to monitor; unfreeze some (requires_grad=True)")
        return layers

    @property
    def layer_names(self) -> list[str]:
        return [state.name for state in self._layers]

    # -- attach / detach ------------------------------------------------------------------------
    def attach(self) -> "GradientMonitor":
        """Start watching (idempotent): open ``path``, hook the optimiser, arm the model if this step is sampled."""
        if self.attached:
            return self
        self.attached = self._ever_attached = True
        if self.optimizer is not None:
            self._optimizer_handles = [self.optimizer.register_step_pre_hook(self._optimizer_pre_hook),
                                       self.optimizer.register_step_post_hook(self._optimizer_post_hook)]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
        if self.step_count % self.every == 0:
            self._arm()
        self._arm_curvature()
        return self

    def detach(self) -> None:
        """Remove every hook and close the file; records stay available."""
        if self.attached and self.step_count == 0 and self._snapshot is not None:
            self._warn_unrecorded("training forward passes ran while it was attached, but no step was counted")
        self._disarm()
        self._disarm_curvature()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
        if self._file is not None:
            self._file.close()
            self._file = None
        self.attached = False
        self._reset_sample()
        self._snapshot_buffers = None

    def __enter__(self) -> "GradientMonitor":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _arm(self) -> None:
        """Register the model hooks for one sampled step (or re-enable those kept from the step before)."""
        if self._sample_handles:
            self.sampling = True
            return
        handles = [state.module.register_forward_pre_hook(self._layer_pre_hook) for state in self._layers]
        handles += [module.register_forward_hook(self._activation_hook) for module in self._activations]
        handles += [param.register_post_accumulate_grad_hook(self._raw_gradient_hook) for param in self._params]
        handles.append(self.model.register_forward_hook(self._output_hook))
        self._sample_handles = handles
        self.sampling = True

    def _disarm(self) -> None:
        for handle in self._sample_handles:
            handle.remove()
        self._sample_handles = []
        self.sampling = False

    # -- hooks (armed on sampled steps only; each also checks the flag) --------------------------
    def _layer_pre_hook(self, module: nn.Module, inputs: Any) -> None:
        if self.sampling:
            if self._snapshot is None and torch.is_grad_enabled():
                self._take_snapshot(module)
            self._enter_layer(module, inputs)

    def _activation_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.sampling:
            self._record_activation(module, output)

    def _output_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # The width of a (batch, C) output: C classes, whose chance loss ln(C) the "not_learning" rule compares.
        if self.sampling and torch.is_grad_enabled() and isinstance(output, Tensor) and output.dim() == 2:
            self._output_width = int(output.shape[1])

    def _raw_gradient_hook(self, param: Tensor) -> None:
        if self.sampling:
            self._record_raw_gradient(param)

    def _optimizer_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.sampling:
            self._read_gradients()

    def _optimizer_post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._end_step()

    # -- the work, on sampled steps only ----------------------------------------------------------
    def _reset_sample(self) -> None:
        for state in self._layers:
            state.reset()
        self._current: _LayerState | None = None  # last parameterised layer run in this sampled forward
        self._snapshot: list[Tensor] | None = None  # all parameters at the first training forward of the step
        self._raw_norms: dict[int, Tensor] = {}  # param position -> ‖grad‖ right after backward (pre-clipping)
        self._raw_pending: list[int] = []  # params whose gradient the running backward pass has accumulated
        self._old_norms: list[Tensor] | None = None  # ‖θ‖ per param before the step, read with the gradients
        # Per param: gradient norm and max |g| as the optimiser is about to use them (None: no .grad).
        self._gradients: tuple[list[Tensor | None], list[Tensor | None]] | None = None
        self._forward_count = 0  # layers entered so far in this sampled step's training forwards

    def _take_snapshot(self, module: nn.Module) -> None:
        """At the step's first training forward, copy the weights as it sees them (before the optimiser moves
        them; needed for ‖Δθ‖) into buffers kept across samples: one fused copy and no allocation after the first
        sample (the buffers, one copy of the trainable weights, are freed by ``detach``)."""
        if not self._by_module[id(module)].params[0].requires_grad:
            return
        weights = [p.detach() for p in self._params]
        buffers = self._snapshot_buffers
        if buffers is None or any(b.shape != w.shape or b.dtype != w.dtype or b.device != w.device
                                  for b, w in zip(buffers, weights, strict=True)):
            buffers = self._snapshot_buffers = [torch.empty_like(w) for w in weights]
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(buffers, weights)
        else:
            for buffer, weight in zip(buffers, weights, strict=True):
                buffer.copy_(weight)
        self._snapshot = buffers

    def _enter_layer(self, module: nn.Module, inputs: Any) -> None:
        """Remember the layer for the activation that follows; note the forward order, and the scale and
        finiteness of the first layer's input."""
        state = self._by_module[id(module)]
        # Only forwards that will produce parameter gradients count (not attacks with frozen weights, not
        # evaluation under no_grad).
        if not (torch.is_grad_enabled() and state.params[0].requires_grad):
            self._current = None
            return
        self._current = state
        if state.forward_index is None and state.leaf:
            state.forward_index = self._forward_count
            self._forward_count += 1
            first = inputs[0] if isinstance(inputs, tuple) and inputs else None
            if state.forward_index == 0 and isinstance(first, Tensor) and first.is_floating_point() and first.numel():
                x = first.detach()
                state.input_stats = _input_stats(x)

    def _record_activation(self, module: nn.Module, output: Any) -> None:
        state = self._current
        if state is None or not isinstance(output, Tensor) or output.dim() < 2:
            return
        out = output.detach()
        if isinstance(module, RELU_TYPES):
            # A unit is a feature (Linear; last dim on sequences) or a channel (dim 1, convolutions).
            # Over the batch first (an element-wise max of contiguous slices), then what is left of the other
            # dims: on CPU about 1.5x faster than amax over (0, 2) and 3x faster than one amax over (0, 2, 3).
            peak = out.amax(dim=0)
            if out.dim() == 3 and isinstance(state.module, nn.Linear):
                peak = peak.amax(dim=0)
            elif peak.dim() > 1:
                peak = peak.flatten(1).amax(dim=1)
            positive = peak > 0  # no copy of the activation
            state.ever_positive = positive if state.ever_positive is None else state.ever_positive | positive
            state.activation = "relu"
        else:
            if isinstance(module, SIGMOID_TYPES):
                saturated = (out < SIGMOID_MARGIN) | (out > 1.0 - SIGMOID_MARGIN)
                state.activation = "sigmoid"
            else:
                saturated = out.abs() > TANH_LIMIT
                state.activation = "tanh"
            state.saturated = state.saturated + saturated.sum()
            state.elements += out.numel()

    def _record_raw_gradient(self, param: Tensor) -> None:
        """Note a gradient accumulated by this backward; its norm, before any clipping (kept as evidence), is
        taken for all of them at once when the backward pass ends."""
        position = self._param_position.get(id(param))
        if position is None:
            return
        if _queue_backward_callback is None:  # no engine callbacks in this torch: one norm per parameter
            if param.grad is not None:
                self._raw_norms[position] = torch.linalg.vector_norm(param.grad.detach())
            return
        if not self._raw_pending:
            _queue_backward_callback(self._read_raw_gradients)
        self._raw_pending.append(position)

    def _read_raw_gradients(self) -> None:
        """End of a backward pass: the norms of the gradients it accumulated, in one fused call."""
        positions = [i for i in self._raw_pending if self._params[i].grad is not None]
        self._raw_pending = []
        norms = _norms([self._params[i].grad.detach() for i in positions])  # type: ignore[union-attr]
        self._raw_norms.update(zip(positions, norms, strict=True))

    def _read_gradients(self) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Per-parameter gradient norm and max |g|, as the optimiser is about to use them."""
        grads = [p.grad.detach() if p.grad is not None else None for p in self._params]
        present = [g for g in grads if g is not None]
        # The weights' norms before the step (the snapshot) ride along in the same fused call.
        found = _norms(present + (self._snapshot or []))
        self._old_norms = found[len(present):]
        norms, maxima = iter(found[:len(present)]), iter(_abs_maxima(present))
        self._gradients = ([next(norms) if g is not None else None for g in grads],
                           [next(maxima) if g is not None else None for g in grads])
        return self._gradients

    def _finish_sample(self) -> None:
        grad_norms, grad_maxima = self._gradients or self._read_gradients()
        if all(n is None for n in grad_norms) and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn("GradientMonitor: no parameter has a .grad at step(); call monitor.step() after "
                          "optimizer.step() and before optimizer.zero_grad()", RuntimeWarning, stacklevel=4)
        if self.distributed:
            self._combine_across_ranks()
        records = self._layer_records(grad_norms, grad_maxima)
        self.records.extend(records)
        if self._file is not None:
            self._file.write("".join(json.dumps(record) + "\n" for record in records))
            self._file.flush()

    def _combine_across_ranks(self) -> None:
        """Under DDP: units alive on any rank are alive; saturation counts, input statistics and the loss are
        summed (the loss averaged), so the records describe the whole batch as one process would see it."""
        import torch.distributed as dist

        world = dist.get_world_size()
        alive = [(state, state.ever_positive) for state in self._layers if state.ever_positive is not None]
        if alive:
            flags = torch.cat([positive.float() for _, positive in alive])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            for (state, _), part in zip(alive, flags.split([positive.numel() for _, positive in alive]), strict=True):
                state.ever_positive = part > 0
        device = self._params[0].device
        counted = [state for state in self._layers if state.elements]
        sums = torch.stack([torch.as_tensor(state.saturated, device=device, dtype=torch.float64) for state in counted]
                           + [torch.tensor(float(state.elements), device=device, dtype=torch.float64)
                              for state in counted]) if counted else torch.zeros(0, device=device, dtype=torch.float64)
        first = next((state for state in self._layers if state.input_stats is not None), None)
        stats = first.input_stats if first is not None else None
        loss = torch.as_tensor(self._loss if self._loss is not None else math.nan, device=device,
                               dtype=torch.float64).reshape(1) / world
        inputs = stats[:2].double() if stats is not None else torch.zeros(2, device=device, dtype=torch.float64)
        packed = torch.cat([sums, inputs, loss])
        dist.all_reduce(packed)
        if first is not None and stats is not None:
            peak = stats[2:].clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            first.input_stats = torch.cat([packed[-3:-1].float(), peak])
        for i, state in enumerate(counted):
            state.saturated, state.elements = packed[i], int(packed[len(counted) + i])
        if self._loss is not None:
            self._loss = packed[-1]

    def _layer_records(self, grad_norms: list[Tensor | None], grad_maxima: list[Tensor | None]) -> list[dict]:
        """One record per layer for the sampled step; all tensor results are read back in one sync."""
        count = len(self._params)
        weights = [p.detach() for p in self._params]
        olds = self._snapshot or []  # all parameters; none when no training forward ran in this sampled step
        old_norms = self._old_norms if self._old_norms is not None else _norms(olds)  # ‖θ before the step‖
        _subtract_(olds, weights)  # the snapshot buffers now hold -Δθ (they are refilled at the next sample)
        norms = _norms(weights + olds)  # ‖θ‖ and ‖Δθ‖ in one fused call
        missing: list[Tensor | None] = [None] * count
        per_param: dict[str, list[Tensor | None]] = {
            "grad_norm": grad_norms, "grad_max": grad_maxima,
            "raw_grad_norm": [self._raw_norms.get(i) for i in range(count)],
            "weight_norm": list(norms[:count]),
            "old_norm": list(old_norms) or missing,
            # (The Δθ norms are kept as "update_norm" for the whole-model update ratio of the lr findings.)
            "delta_norm": list(norms[count:]) or missing,
        }
        tensors: list[Tensor] = []
        where: dict[tuple[str, int], int] = {}
        slots: dict[str, list[int]] = {}  # per key and parameter: the value's place in `tensors`, -1 if none
        for key, values in per_param.items():
            present = [value for value in values if value is not None]
            if len(present) == len(values):
                slots[key] = list(range(len(tensors), len(tensors) + len(values)))
            else:
                places = iter(range(len(tensors), len(tensors) + len(present)))
                slots[key] = [-1 if value is None else next(places) for value in values]
            tensors.extend(present)
        for state in self._layers:
            if state.ever_positive is not None:
                where["dead_fraction", state.index] = len(tensors)
                tensors.append((~state.ever_positive).float().mean())
            if state.elements:
                where["saturated", state.index] = len(tensors)
                tensors.append(torch.as_tensor(state.saturated))
            if state.input_stats is not None:
                where["input", state.index] = len(tensors)
                tensors.extend(state.input_stats.to(tensors[0].device if tensors else state.input_stats.device)
                               .unbind())
        if isinstance(self._loss, Tensor):
            where["loss", 0] = len(tensors)
            tensors.append(self._loss)
        if isinstance(self._bad_loss_step, Tensor):
            where["bad_loss_step", 0] = len(tensors)
            tensors.append(self._bad_loss_step)
        numbers = _read_back(tensors)
        loss = numbers[where["loss", 0]] if ("loss", 0) in where else self._loss
        assert loss is None or isinstance(loss, float)
        bad_loss = int(numbers[where["bad_loss_step", 0]]) if ("bad_loss_step", 0) in where else self._bad_loss_step
        self._bad_loss_step = -1

        def combined(key: str, layer: int, reduce: str) -> float | None:
            row = slots[key]
            values = [numbers[row[i]] for i in self._positions[layer] if row[i] >= 0]
            if not values:
                return None
            if reduce == "max":
                return math.nan if any(math.isnan(v) for v in values) else max(values)
            return math.sqrt(sum(v * v for v in values))

        records = []
        for state in self._layers:
            layer = state.index
            stats = {key: combined(key, layer, "max" if key == "grad_max" else "rss") for key in per_param}
            grad_norm, grad_max, old_norm, delta_norm = (stats["grad_norm"], stats["grad_max"], stats["old_norm"],
                                                         stats["delta_norm"])
            # grad_max is known exactly when grad_norm is (both come from the same .grad fields).
            finite = grad_norm is None or (math.isfinite(grad_norm)
                                           and grad_max is not None and math.isfinite(grad_max))
            update_ratio = delta_norm / old_norm if delta_norm is not None and old_norm else None
            saturated = numbers[where["saturated", layer]] / state.elements if ("saturated", layer) in where else None
            inputs = {}
            if ("input", layer) in where:
                squares, elements, peak = numbers[where["input", layer]:where["input", layer] + 3]
                clean = math.isfinite(squares) and math.isfinite(peak)
                inputs = {"input_rms": math.sqrt(squares / elements) if clean else None,
                          "input_absmax": peak if clean else None, "input_finite": clean}
            records.append({
                "step": self.step_count, "layer": state.name, "index": layer, "type": type(state.module).__name__,
                "numel": sum(p.numel() for p in state.params),
                "grad_norm": _finite_or_none(grad_norm), "grad_max": _finite_or_none(grad_max), "grad_finite": finite,
                "raw_grad_norm": _finite_or_none(stats["raw_grad_norm"]),
                "weight_norm": _finite_or_none(stats["weight_norm"]),
                "weight_finite": stats["weight_norm"] is not None and math.isfinite(stats["weight_norm"]),
                "update_ratio": _finite_or_none(update_ratio), "activation": state.activation,
                "dead_fraction": numbers[where["dead_fraction", layer]] if ("dead_fraction", layer) in where else None,
                "saturated_fraction": saturated, "forward_index": state.forward_index,
                "update_norm": _finite_or_none(delta_norm),
                "loss": _finite_or_none(loss), "loss_finite": None if loss is None else math.isfinite(loss),
                "loss_nonfinite_step": bad_loss if bad_loss >= 0 else None, "output_width": self._output_width,
                **inputs,
            })
        return records

    # -- public ----------------------------------------------------------------------------------
    def step(self, loss: float | Tensor | None = None, *, targets: Tensor | None = None) -> None:
        """Mark the end of one training step (call after ``optimizer.step()``, before ``zero_grad()``).

        ``loss`` (recommended) is checked for NaN/inf at every step without a host sync, and the latest one is
        stored with the sampled step's records (it feeds the "nonfinite" and "lr_too_low" findings). With
        ``optimizer=`` given, steps are counted by the optimiser's hooks and this call only notes ``loss``.
        ``targets`` (the batch's labels) are used by the curvature measurement of ``curvature_every`` (when steps
        are counted here; the optimiser's hooks measure before this call, on the predictions).
        """
        if loss is not None:
            self._note_loss(loss)
        if self.optimizer is not None and self.attached:
            return
        if not self.attached and not self._ever_attached:
            # Handed to a loop (e.g. Trainer(monitor=...)) without `with`/attach(): start watching now, so
            # the next sampled step is recorded instead of nothing at all. The step ending now was not watched.
            self.attach()
            self._disarm()
        self._targets = targets
        self._end_step()

    def _note_loss(self, loss: float | Tensor) -> None:
        """Keep the latest loss; remember the first step whose loss was not finite (a tensor op: no sync)."""
        # With the optimiser's hooks counting, the step this loss belongs to has already been counted.
        step = self.step_count - 1 if (self.optimizer is not None and self.attached) else self.step_count
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise InputError(f"loss: expected the scalar training loss, got a tensor of shape {tuple(loss.shape)}")
            value: Tensor | float = loss.detach().reshape(())
            assert isinstance(value, Tensor)
            pending = (self._bad_loss_step if isinstance(self._bad_loss_step, Tensor)
                       else torch.tensor(self._bad_loss_step, device=value.device))
            self._bad_loss_step = torch.where(torch.isfinite(value) | (pending >= 0), pending, step)
        else:
            value = float(loss)
            if not math.isfinite(value) and isinstance(self._bad_loss_step, int) and self._bad_loss_step < 0:
                self._bad_loss_step = step
        self._loss = value
        if self.on_finding is not None and not self.distributed and not math.isfinite(float(value)):
            evidence = {"first_step": step, "loss": float(value), "loss_nonfinite_step": step}
            self._act([Finding("nonfinite", "(loss)", evidence, ADVICE["nonfinite"])], step=step)

    def _end_step(self) -> None:
        sampled = self.sampling
        if sampled:
            self._finish_sample()
            if self.attached and (self.step_count + 1) % self.every == 0:
                self.sampling = False  # the next step is sampled too: keep the hooks, idle until _arm
            else:
                self._disarm()
            self._reset_sample()
        self._measure_curvature()
        self.step_count += 1
        if self.attached and self.step_count % self.every == 0:
            self._arm()
        self._arm_curvature()
        if sampled and self.on_finding is not None:
            self._act(self.findings())

    def _act(self, findings: list[Finding], step: int | None = None) -> None:
        """Apply ``on_finding`` to each finding not acted on before (a fatal kind once, others once per layer).

        ``step``: the step acted at (default: the step just counted; a loss checked before its step is counted,
        as with ``step(loss)`` and no optimiser hooks, passes its own)."""
        step = max(self.step_count - 1, 0) if step is None else step
        for finding in findings:
            key = finding.kind if finding.kind in FATAL_KINDS else (finding.kind, finding.layer)
            if key in self._acted or finding.kind == "unrecorded":
                continue
            self._acted.add(key)
            fatal = finding.kind in FATAL_KINDS
            action = ("callable" if callable(self.on_finding) else
                      "stop" if self.on_finding == "stop" and fatal else "warn")
            self.actions.append({"step": step, "kind": finding.kind, "layer": finding.layer, "action": action})
            if callable(self.on_finding):
                self.on_finding(finding)
            elif action == "stop":
                raise TrainingStopped(finding, step)
            else:
                warnings.warn(f"GradientMonitor (step {step}): {finding}", GradientHealthWarning, stacklevel=3)

    # -- curvature (curvature_every) --------------------------------------------------------------
    def _arm_curvature(self) -> None:
        """Hook the model's input for a step whose curvature is due (no hook on the other steps)."""
        if self.sharpness is not None and self.attached and self._batch_handle is None \
                and self.sharpness.due(self.step_count):
            self._batch_handle = self.model.register_forward_pre_hook(self._batch_hook)

    def _disarm_curvature(self) -> None:
        if self._batch_handle is not None:
            self._batch_handle.remove()
            self._batch_handle = None

    def _batch_hook(self, module: nn.Module, inputs: Any) -> None:
        if torch.is_grad_enabled() and module.training and inputs and isinstance(inputs[0], Tensor):
            self._batch = inputs[0].detach()  # the last training forward of the step: what the optimiser fits

    def _measure_curvature(self) -> None:
        batch, targets, self._batch, self._targets = self._batch, self._targets, None, None
        self._disarm_curvature()
        if self.sharpness is None or batch is None:
            return
        if targets is not None and targets.shape[0] != batch.shape[0]:
            targets = None
        record = self.sharpness.measure(self.step_count, batch, targets)
        if self.path is not None:
            with open(self.path.with_name("curvature.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    @property
    def curvature_records(self) -> list[dict]:
        """One record per curvature measurement: step, top_eigenvalue, threshold, ratio, lr, seconds."""
        return list(self.sharpness.records) if self.sharpness is not None else []

    def findings(self) -> list[Finding]:
        """Diagnose the records so far (see ``findings_from_records``), plus "sharpness" with ``curvature_every``.

        With no step recorded the answer is an "unrecorded" finding and a warning, never an empty list.
        """
        if not self.records:
            reason = ("no training step was counted: pass optimizer= or call monitor.step() after optimizer.step()"
                      if self.step_count == 0 else
                      f"{self.step_count} steps were counted but none was sampled while attached")
            self._warn_unrecorded(reason)
            finding = findings_from_records([])[0]
            finding.evidence.update(reason=reason, steps_counted=self.step_count, attached=self.attached)
            return [finding]
        findings = findings_from_records(self.records)
        tracker = self.sharpness
        unstable = tracker.unstable() if tracker is not None else []
        if tracker is not None and unstable:
            first, worst = unstable[0], max(unstable, key=lambda record: record["ratio"])
            evidence = {"first_step": first["step"], "top_eigenvalue": first["top_eigenvalue"],
                        "threshold": first["threshold"], "ratio": first["ratio"], "lr": first["lr"],
                        "worst_ratio": worst["ratio"], "quantity": first["quantity"],
                        "measured": len(tracker.records), "over_threshold": len(unstable)}
            findings.insert(0, Finding("sharpness", "(whole model)", evidence, ADVICE["sharpness"]))
        return findings

    def _warn_unrecorded(self, reason: str) -> None:
        if not self._warned_unrecorded:
            self._warned_unrecorded = True
            warnings.warn(f"GradientMonitor recorded nothing ({reason}), so its findings are not an all-clear. "
                          "Pass optimizer= (GradientMonitor(model, optimizer=opt)) or call monitor.step() after "
                          "each optimizer.step().", RuntimeWarning, stacklevel=3)

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the gradient-flow, norm heat-map and activation-health PNGs; return their paths."""
        return plot_all(self.records, out_dir)

    def __repr__(self) -> str:
        return (f"GradientMonitor(layers={len(self._layers)}, every={self.every}, steps={self.step_count}, "
                f"records={len(self.records)}, attached={self.attached})")


# ------------------------------------------------------------------------------------------------
# Records -> findings
# ------------------------------------------------------------------------------------------------
def load_gradflow(path: str | os.PathLike) -> list[dict]:
    """Read a ``gradflow.jsonl`` file (one record per line) back into a list of dicts."""
    path = Path(path)
    if path.is_dir():
        path = path / "gradflow.jsonl"
    if not path.exists():
        raise DataError(f"path: {str(path)!r} does not exist; pass the gradflow.jsonl a GradientMonitor(path=...) wrote")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"path: line {number} of {str(path)!r} is not JSON ({error}); the file is corrupt") from None
            if not isinstance(record, dict) or "layer" not in record or "step" not in record:
                raise DataError(f"path: line {number} of {str(path)!r} is not a gradflow record (needs 'step' and 'layer')")
            records.append(record)
    return records


def findings_from_records(records: Iterable[dict]) -> list[Finding]:
    """Diagnose gradient-health records (from ``GradientMonitor.records`` or ``load_gradflow``).

    Returns findings in the order of ``KINDS`` (fatal ones first); an empty list means healthy. No records at all
    give an "unrecorded" finding: nothing was measured, which is not an all-clear. Once the loss, a gradient or a
    weight turns non-finite ("nonfinite"), the other rules look only at the samples before it.
    """
    records = list(records)
    if not records:
        return [Finding("unrecorded", WHOLE_MODEL, {"records": 0}, ADVICE["unrecorded"])]
    all_steps = sorted({record["step"] for record in records})
    layers = layer_order(records)
    table = {(record["step"], record["layer"]): record for record in records}
    nonfinite = _nonfinite(table, all_steps, layers)
    steps = [s for s in all_steps if not nonfinite or s < nonfinite[0].evidence["first_step"]]
    activation = _activation_findings(table, steps, layers)
    vanishing = _vanishing(table, steps, layers)
    if vanishing and vanishing[0].evidence["grad_norm_first"] == 0 and any(f.kind == "dead" for f in activation):
        vanishing = []  # an exactly-zero gradient behind dead units is blocked, not vanishing: "dead" says why
    high, low = _learning_rate(table, steps, layers)
    exploding = _exploding(table, steps, layers) or _overflowed(table, steps, layers, nonfinite)
    return (nonfinite + exploding + high + _not_learning(table, steps, layers) + vanishing
            + _stalled(table, steps, layers) + low
            + activation + _inputs(table, steps, layers))


def _series(table: dict, steps: list[int], layer: str, key: str) -> list[tuple[int, float]]:
    values = []
    for step in steps:
        record = table.get((step, layer))
        if record is not None and record.get(key) is not None:
            values.append((step, float(record[key])))
    return values


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _rms(record: dict | None) -> float | None:
    if record is None or record.get("grad_norm") is None:
        return None
    return record["grad_norm"] / math.sqrt(max(int(record.get("numel") or 1), 1))


def _total_grad_norms(table: dict, steps: list[int], layers: list[str]) -> list[tuple[int, float]]:
    totals = []
    for step in steps:
        norms = [table[(step, layer)]["grad_norm"] for layer in layers
                 if (step, layer) in table and table[(step, layer)].get("grad_norm") is not None]
        if norms:
            totals.append((step, math.sqrt(sum(n * n for n in norms))))
    return totals


def _nonfinite(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    """NaN/inf in the loss (any step passed to step()), a gradient or a weight (sampled steps). Names the layer
    the backward pass reached first among those with a non-finite gradient (the one nearest the loss)."""
    loss_steps = [table[(step, layer)]["loss_nonfinite_step"] for step in steps for layer in layers
                  if (step, layer) in table and table[(step, layer)].get("loss_nonfinite_step") is not None]
    bad = [(step, layer) for step in steps for layer in layers if (step, layer) in table
           and (table[(step, layer)].get("grad_finite") is False or table[(step, layer)].get("weight_finite") is False
                or table[(step, layer)].get("loss_finite") is False)]
    inputs = [step for step in steps for layer in layers
              if (step, layer) in table and table[(step, layer)].get("input_finite") is False]
    if not (bad or loss_steps or inputs):
        return []
    first_record = bad[0][0] if bad else None
    first = min(s for s in (first_record, min(loss_steps, default=None), min(inputs, default=None)) if s is not None)
    at = first_record if first_record is not None else first
    grads = [layer for layer in layers if (at, layer) in table and table[(at, layer)].get("grad_finite") is False]
    weights = [layer for layer in layers if (at, layer) in table and table[(at, layer)].get("weight_finite") is False]
    evidence: dict[str, Any] = {"first_step": first, "loss_nonfinite_step": min(loss_steps, default=None),
                                "input_nonfinite_step": min(inputs, default=None), "sampled_step": at,
                                "nonfinite_grad_layers": list(reversed(grads)), "nonfinite_weight_layers": weights,
                                "nonfinite_samples": len({step for step, _ in bad})}
    totals = _total_grad_norms(table, [s for s in steps if s < first], layers)
    if totals:
        evidence["last_finite_grad_norm"] = totals[-1][1]
    layer = grads[-1] if grads else weights[0] if weights else "(input)" if inputs else "(loss)"
    return [Finding("nonfinite", layer, evidence, ADVICE["nonfinite"])]


def _growth(totals: list[tuple[int, float]]) -> dict[str, Any]:
    """Start (median of the first samples), peak and peak/start of a total-gradient-norm series."""
    start = _median(v for _, v in totals[:START_SAMPLES])
    peak_step, peak = max(totals, key=lambda item: item[1])
    return {"start_grad_norm": start, "peak_grad_norm": peak, "peak_step": peak_step,
            "growth": peak / start if start > 0 else math.inf}


def _exploding(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    totals = _total_grad_norms(table, steps, layers)
    if len(totals) < 2:
        return []
    grown = _growth(totals)
    jump_step, jump = _largest_jump(totals, grown["start_grad_norm"])
    if grown["growth"] < EXPLODING_GROWTH and jump < EXPLODING_JUMP:
        return []
    # Blame the layer whose own gradient grew the most.
    layer_growth: dict[str, float] = {}
    for layer in layers:
        series = _series(table, steps, layer, "grad_norm")
        if len(series) >= 2:
            first = _median(v for _, v in series[:START_SAMPLES])
            layer_growth[layer] = max(v for _, v in series) / first if first > 0 else math.inf
    worst = max(layer_growth, key=lambda layer: layer_growth[layer]) if layer_growth else layers[0]
    evidence = {**grown, "largest_jump": jump, "jump_step": jump_step, "layer_growth": layer_growth.get(worst),
                "growth_threshold": EXPLODING_GROWTH, "jump_threshold": EXPLODING_JUMP}
    return [Finding("exploding", worst, evidence, ADVICE["exploding"])]


def _overflowed(table: dict, steps: list[int], layers: list[str], nonfinite: list[Finding]) -> list[Finding]:
    """An explosion that overflowed between two samples: gradients went NaN/inf (not from the input) after the
    finite samples' total gradient norm grew >= EXPLODING_BEFORE_OVERFLOW x while the loss rose above its start."""
    if not nonfinite or nonfinite[0].evidence.get("input_nonfinite_step") is not None:
        return []
    totals = _total_grad_norms(table, steps, layers)
    losses = _losses(table, steps, layers)
    if len(totals) < 2 or len(losses) < 2:
        return []
    grown = _growth(totals)
    loss_start = _median(losses[:START_SAMPLES])
    if grown["growth"] < EXPLODING_BEFORE_OVERFLOW or losses[-1] <= loss_start:
        return []
    evidence = {**grown, "overflow_step": nonfinite[0].evidence["first_step"], "loss_start": loss_start,
                "loss_before_overflow": losses[-1], "growth_threshold": EXPLODING_BEFORE_OVERFLOW}
    return [Finding("exploding", WHOLE_MODEL, evidence, ADVICE["exploding"])]


def _largest_jump(totals: list[tuple[int, float]], start: float) -> tuple[int | None, float]:
    """Largest factor by which a sample exceeds the median of the samples before it.

    Only samples above the starting norm count: a near-converged model's tiny gradient growing back on a
    hard batch is not an explosion.
    """
    best: tuple[int | None, float] = (None, 0.0)
    for i in range(1, len(totals)):
        step, value = totals[i]
        before = _median(v for _, v in totals[max(0, i - RECENT_SAMPLES):i])
        if value > start and before > 0 and value / before > best[1]:
            best = (step, value / before)
    return best


def _depth_ratios(table: dict, steps: list[int], first: str, last: str) -> list[tuple[int, float]]:
    ratios = []
    for step in steps:
        top, bottom = _rms(table.get((step, first))), _rms(table.get((step, last)))
        if top is not None and bottom:
            ratios.append((step, top / bottom))
    return ratios


def depth_ends(table: dict, layers: list[str]) -> tuple[str, str] | None:
    """First and last layer the forward pass ran (containers owning parameters have no forward position;
    records from before ``forward_index`` existed use the registration order); None with fewer than two."""
    placed = {name for (_, name), record in table.items() if record.get("forward_index") is not None}
    ordered = [layer for layer in layers if layer in placed]
    ends = ordered if len(ordered) >= 2 else layers
    return (ends[0], ends[-1]) if len(ends) >= 2 else None


def _vanishing(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    ends = depth_ends(table, layers)
    if ends is None:
        return []
    first, last = ends
    ratios = _depth_ratios(table, steps, first, last)
    if not ratios:
        return []
    recent = _median(r for _, r in ratios[-RECENT_SAMPLES:])
    start = _median(r for _, r in ratios[:START_SAMPLES])
    drop = start / recent if recent > 0 else math.inf
    if recent >= VANISHING_RATIO and (len(ratios) < START_SAMPLES + RECENT_SAMPLES or drop < VANISHING_DROP):
        return []
    recent_steps = [s for s, _ in ratios[-RECENT_SAMPLES:]]
    evidence = {
        "first_layer": first, "last_layer": last,
        "grad_ratio_first_last": recent, "grad_ratio_first_last_at_start": start,
        "grad_norm_first": _median(table[(s, first)]["grad_norm"] for s in recent_steps),
        "grad_norm_last": _median(table[(s, last)]["grad_norm"] for s in recent_steps),
        "per_layer_grad_rms": {layer: _median_rms(table, recent_steps, layer) for layer in layers},
        "ratio_threshold": VANISHING_RATIO, "measure": "gradient RMS (norm / sqrt(numel)), median of recent samples",
    }
    return [Finding("vanishing", first, evidence, ADVICE["vanishing"])]


def _median_rms(table: dict, steps: list[int], layer: str) -> float | None:
    values = [_rms(table.get((s, layer))) for s in steps]
    known = [v for v in values if v is not None]
    return _median(known) if known else None


def _stalled(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    ratios = {}
    for layer in layers:
        series = _series(table, steps, layer, "update_ratio")
        if series:
            ratios[layer] = _median(v for _, v in series[-RECENT_SAMPLES:])
    if len(ratios) < 2:
        return []
    typical = _median(ratios.values())
    findings = []
    for layer, ratio in ratios.items():
        if typical > 0 and ratio < STALLED_FACTOR * typical:
            evidence = {"update_ratio": ratio, "median_update_ratio": typical, "relative": ratio / typical,
                        "threshold": STALLED_FACTOR}
            findings.append(Finding("stalled", layer, evidence, ADVICE["stalled"]))
    return findings


def _model_update_ratios(table: dict, steps: list[int], layers: list[str]) -> list[tuple[int, float]]:
    """Per sampled step, ‖Δθ‖ / ‖θ‖ over the whole model (layers with both numbers)."""
    ratios = []
    for step in steps:
        deltas, weights = 0.0, 0.0
        for layer in layers:
            record = table.get((step, layer))
            if record is None or record.get("weight_norm") is None or record.get("update_ratio") is None:
                continue
            delta = record.get("update_norm")
            delta = record["update_ratio"] * record["weight_norm"] if delta is None else delta
            deltas, weights = deltas + delta * delta, weights + record["weight_norm"] ** 2
        if weights > 0:
            ratios.append((step, math.sqrt(deltas / weights)))
    return ratios


def _losses(table: dict, steps: list[int], layers: list[str]) -> list[float]:
    values = []
    for step in steps:
        record = next((table[(step, layer)] for layer in layers if (step, layer) in table), None)
        if record is not None and record.get("loss") is not None:
            values.append(float(record["loss"]))
    return values


def _learning_rate(table: dict, steps: list[int], layers: list[str]) -> tuple[list[Finding], list[Finding]]:
    """Learning rate too high / too low, from the whole model's update ratio over the run (median of all
    samples, so a warm-up or a decay to zero at the end does not decide it)."""
    ratios = _model_update_ratios(table, steps, layers)
    if len(ratios) < RECENT_SAMPLES:
        return [], []
    typical = _median(r for _, r in ratios)
    evidence: dict[str, Any] = {"update_ratio": typical, "samples": len(ratios),
                                "measure": "‖Δθ‖/‖θ‖ of the whole model, median over the sampled steps"}
    if typical > LR_HIGH_RATIO:
        above = sum(r > LR_HIGH_RATIO for _, r in ratios)
        evidence.update(threshold=LR_HIGH_RATIO, samples_above=above)
        return [Finding("lr_too_high", WHOLE_MODEL, evidence, ADVICE["lr_too_high"])], []
    if typical < LR_LOW_RATIO:
        losses = _losses(table, steps, layers)
        change = None
        if len(losses) >= 2:
            start = _median(losses[:START_SAMPLES])
            change = abs(start - _median(losses[-RECENT_SAMPLES:])) / max(abs(start), 1e-12)
            if change >= LR_LOW_LOSS_CHANGE:
                return [], []
        evidence.update(threshold=LR_LOW_RATIO, loss_change=change, loss_change_threshold=LR_LOW_LOSS_CHANGE)
        return [], [Finding("lr_too_low", WHOLE_MODEL, evidence, ADVICE["lr_too_low"])]
    return [], []


def not_learning_level(table: dict, steps: list[int], layers: list[str]) -> dict[str, Any] | None:
    """The loss numbers the "not_learning" rule compares: the start (median of the first samples) and recent (median
    of the latest) loss, the chance loss ln(C) when the output width C >= 2 is recorded, and ``ratio`` = recent /
    max(start, chance). None before START_SAMPLES + RECENT_SAMPLES losses (the warm-up)."""
    losses = _losses(table, steps, layers)
    if len(losses) < START_SAMPLES + RECENT_SAMPLES:
        return None
    start, recent = _median(losses[:START_SAMPLES]), _median(losses[-RECENT_SAMPLES:])
    widths = [record["output_width"] for record in table.values() if record.get("output_width")]
    width = widths[-1] if widths else None
    chance = math.log(width) if width is not None and width >= 2 else None
    level = max(start, chance) if chance is not None else start
    return {"loss_start": start, "loss_recent": recent, "chance_loss": chance, "output_width": width,
            "ratio": recent / level if level > 0 else None, "samples": len(losses)}


def _not_learning(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    """Not learning: the recent loss sits at or above NOT_LEARNING_RATIO x the higher of its start and ln(C) after the
    total gradient norm peaked NOT_LEARNING_GROWTH x above its start (a slow starter's gradient stays flat), or at or
    above NOT_LEARNING_DIVERGED x that level whatever the gradient did (diverged)."""
    level = not_learning_level(table, steps, layers)
    if level is None or level["ratio"] is None or level["ratio"] < NOT_LEARNING_RATIO:
        return []
    totals = _total_grad_norms(table, steps, layers)
    growth = _growth(totals)["growth"] if len(totals) >= 2 else None
    if level["ratio"] < NOT_LEARNING_DIVERGED and (growth is None or growth < NOT_LEARNING_GROWTH):
        return []
    evidence = {**level, "grad_growth": growth, "ratio_threshold": NOT_LEARNING_RATIO,
                "growth_threshold": NOT_LEARNING_GROWTH, "diverged_threshold": NOT_LEARNING_DIVERGED,
                "measure": "ratio = median of the recent losses / max(median of the first losses, ln(output width)); "
                           "grad_growth = peak / start of the total gradient norm"}
    return [Finding("not_learning", WHOLE_MODEL, evidence, ADVICE["not_learning"])]


def _inputs(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    """Inputs not normalised: the first layer's input RMS (median over samples) above INPUT_RMS_LIMIT."""
    for layer in layers:
        series = _series(table, steps, layer, "input_rms")
        if series:
            rms = _median(v for _, v in series)
            if rms <= INPUT_RMS_LIMIT:
                return []
            peaks = [v for _, v in _series(table, steps, layer, "input_absmax")]
            evidence = {"input_rms": rms, "input_absmax": max(peaks) if peaks else None,
                        "threshold": INPUT_RMS_LIMIT, "samples": len(series)}
            return [Finding("inputs_not_normalised", layer, evidence, ADVICE["inputs_not_normalised"])]
    return []


def _activation_findings(table: dict, steps: list[int], layers: list[str]) -> list[Finding]:
    findings = []
    for kind, key, threshold in (("dead", "dead_fraction", DEAD_FRACTION),
                                 ("saturated", "saturated_fraction", SATURATED_FRACTION)):
        for layer in layers:
            series = _series(table, steps, layer, key)
            if not series:
                continue
            recent = _median(v for _, v in series[-RECENT_SAMPLES:])
            evidence: dict[str, Any] = {key: recent, "at_start": series[0][1]}
            if recent >= threshold:
                activation = next((table[(s, layer)].get("activation") for s, _ in reversed(series)), None)
                evidence.update(activation=activation, threshold=threshold, samples=len(series))
                findings.append(Finding(kind, layer, evidence, ADVICE[kind]))
    return findings


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
