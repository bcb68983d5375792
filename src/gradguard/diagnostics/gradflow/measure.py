"""Per-layer measurement of one sampled step: what the monitor's hooks collect and how it becomes records.

``LayerStats`` holds the model's parameterised layers and the scratch space of the sampled step in progress: the
weight snapshot (for ‖Δθ‖), activation statistics (dead ReLU units, saturated sigmoid/tanh outputs), the first
layer's input scale, the raw (pre-clipping) and applied gradient norms, the loss. ``layer_records`` turns them into
one record per layer with a single host sync; ``combine_across_ranks`` first all-reduces what differs between DDP
ranks. The fused tensor work is in ``kernels.py``. ``GradientMonitor`` decides when to measure (hooks, steps);
this module only measures. A new statistic is one more entry here (and in the DDP combine if it differs by rank).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import InputError
from ..health import SATURATION_DERIVATIVE
from . import kernels

__all__ = ["RELU_TYPES", "SIGMOID_MARGIN", "SIGMOID_TYPES", "TANH_LIMIT", "TANH_TYPES", "LayerState", "LayerStats"]

RELU_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
SIGMOID_TYPES: tuple[type, ...] = (nn.Sigmoid,)
TANH_TYPES: tuple[type, ...] = (nn.Tanh,)
# Where the derivative drops below SATURATION_DERIVATIVE of its maximum:
# sigmoid: s(1-s) < 0.05·0.25  <=>  min(s, 1-s) < (1 - sqrt(1 - 0.05)) / 2;   tanh: 1 - t² < 0.05.
SIGMOID_MARGIN = (1.0 - math.sqrt(1.0 - SATURATION_DERIVATIVE)) / 2.0
TANH_LIMIT = math.sqrt(1.0 - SATURATION_DERIVATIVE)


class LayerState:
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

class LayerStats:
    """The parameterised layers of ``model`` and what one sampled step measured on them (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.layers = self.find_layers(model)
        self.by_module = {id(state.module): state for state in self.layers}
        self.params = [p for state in self.layers for p in state.params]
        self.param_position = {id(p): i for i, p in enumerate(self.params)}
        owner = [state.index for state in self.layers for _ in state.params]
        self.positions = [[i for i, o in enumerate(owner) if o == layer] for layer in range(len(self.layers))]
        self.activations = [m for m in model.modules() if isinstance(m, RELU_TYPES + SIGMOID_TYPES + TANH_TYPES)]
        self.snapshot_buffers: list[Tensor] | None = None  # reused by every sample's weight snapshot
        self.reset()
        self.loss: Tensor | float | None = None  # the latest loss passed to step()
        self.output_width: int | None = None  # C of the model's (batch, C) training output, once seen
        self.bad_loss_step: Tensor | int = -1  # first step since the last sample whose loss was NaN/inf

    @staticmethod
    def find_layers(model: nn.Module) -> list[LayerState]:
        layers: list[LayerState] = []
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                layers.append(LayerState(name or type(module).__name__, len(layers), module, params))
        if not layers:
            raise InputError("model: it has no trainable parameters to monitor; unfreeze some (requires_grad=True)")
        return layers

    def reset(self) -> None:
        for state in self.layers:
            state.reset()
        self.current: LayerState | None = None  # last parameterised layer run in this sampled forward
        self.snapshot: list[Tensor] | None = None  # all parameters at the first training forward of the step
        self.raw_norms: dict[int, Tensor] = {}  # param position -> ‖grad‖ right after backward (pre-clipping)
        self.raw_pending: list[int] = []  # params whose gradient the running backward pass has accumulated
        self.old_norms: list[Tensor] | None = None  # ‖θ‖ per param before the step, read with the gradients
        # Per param: gradient norm and max |g| as the optimiser is about to use them (None: no .grad).
        self.gradients: tuple[list[Tensor | None], list[Tensor | None]] | None = None
        self.forward_count = 0  # layers entered so far in this sampled step's training forwards

    def note_loss(self, loss: float | Tensor, step: int) -> Tensor | float:
        """Keep the latest loss; remember the first step whose loss was not finite (a tensor op: no sync)."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise InputError(f"loss: expected the scalar training loss, got a tensor of shape {tuple(loss.shape)}")
            value: Tensor | float = loss.detach().reshape(())
            assert isinstance(value, Tensor)
            pending = (self.bad_loss_step if isinstance(self.bad_loss_step, Tensor)
                       else torch.tensor(self.bad_loss_step, device=value.device))
            self.bad_loss_step = torch.where(torch.isfinite(value) | (pending >= 0), pending, step)
        else:
            value = float(loss)
            if not math.isfinite(value) and isinstance(self.bad_loss_step, int) and self.bad_loss_step < 0:
                self.bad_loss_step = step
        self.loss = value
        return value

    def take_snapshot(self, module: nn.Module) -> None:
        """At the step's first training forward, copy the weights as it sees them (before the optimiser moves
        them; needed for ‖Δθ‖) into buffers kept across samples: one fused copy and no allocation after the first
        sample (the buffers, one copy of the trainable weights, are freed by ``detach``)."""
        if not self.by_module[id(module)].params[0].requires_grad:
            return
        weights = [p.detach() for p in self.params]
        buffers = self.snapshot_buffers
        if buffers is None or any(b.shape != w.shape or b.dtype != w.dtype or b.device != w.device
                                  for b, w in zip(buffers, weights, strict=True)):
            buffers = self.snapshot_buffers = [torch.empty_like(w) for w in weights]
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(buffers, weights)
        else:
            for buffer, weight in zip(buffers, weights, strict=True):
                buffer.copy_(weight)
        self.snapshot = buffers

    def enter_layer(self, module: nn.Module, inputs: Any) -> None:
        """Remember the layer for the activation that follows; note the forward order, and the scale and
        finiteness of the first layer's input."""
        state = self.by_module[id(module)]
        # Only forwards that will produce parameter gradients count (not attacks with frozen weights, not
        # evaluation under no_grad).
        if not (torch.is_grad_enabled() and state.params[0].requires_grad):
            self.current = None
            return
        self.current = state
        if state.forward_index is None and state.leaf:
            state.forward_index = self.forward_count
            self.forward_count += 1
            first = inputs[0] if isinstance(inputs, tuple) and inputs else None
            if state.forward_index == 0 and isinstance(first, Tensor) and first.is_floating_point() and first.numel():
                x = first.detach()
                state.input_stats = kernels.input_stats(x)

    def record_activation(self, module: nn.Module, output: Any) -> None:
        state = self.current
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

    def record_raw_gradient(self, param: Tensor) -> None:
        """Note a gradient accumulated by this backward; its norm, before any clipping (kept as evidence), is
        taken for all of them at once when the backward pass ends."""
        position = self.param_position.get(id(param))
        if position is None:
            return
        if kernels.queue_backward_callback is None:  # no engine callbacks in this torch: one norm per parameter
            if param.grad is not None:
                self.raw_norms[position] = torch.linalg.vector_norm(param.grad.detach())
            return
        if not self.raw_pending:
            kernels.queue_backward_callback(self.read_raw_gradients)
        self.raw_pending.append(position)

    def read_raw_gradients(self) -> None:
        """End of a backward pass: the norms of the gradients it accumulated, in one fused call."""
        positions = [i for i in self.raw_pending if self.params[i].grad is not None]
        self.raw_pending = []
        norms = kernels.norms([self.params[i].grad.detach() for i in positions])  # type: ignore[union-attr]
        self.raw_norms.update(zip(positions, norms, strict=True))

    def read_gradients(self) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Per-parameter gradient norm and max |g|, as the optimiser is about to use them."""
        grads = [p.grad.detach() if p.grad is not None else None for p in self.params]
        present = [g for g in grads if g is not None]
        # The weights' norms before the step (the snapshot) ride along in the same fused call.
        found = kernels.norms(present + (self.snapshot or []))
        self.old_norms = found[len(present):]
        norms, maxima = iter(found[:len(present)]), iter(kernels.abs_maxima(present))
        self.gradients = ([next(norms) if g is not None else None for g in grads],
                           [next(maxima) if g is not None else None for g in grads])
        return self.gradients

    def combine_across_ranks(self) -> None:
        """Under DDP: units alive on any rank are alive; saturation counts, input statistics and the loss are
        summed (the loss averaged), so the records describe the whole batch as one process would see it."""
        import torch.distributed as dist

        world = dist.get_world_size()
        alive = [(state, state.ever_positive) for state in self.layers if state.ever_positive is not None]
        if alive:
            flags = torch.cat([positive.float() for _, positive in alive])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            for (state, _), part in zip(alive, flags.split([positive.numel() for _, positive in alive]), strict=True):
                state.ever_positive = part > 0
        device = self.params[0].device
        counted = [state for state in self.layers if state.elements]
        sums = torch.stack([torch.as_tensor(state.saturated, device=device, dtype=torch.float64) for state in counted]
                           + [torch.tensor(float(state.elements), device=device, dtype=torch.float64)
                              for state in counted]) if counted else torch.zeros(0, device=device, dtype=torch.float64)
        first = next((state for state in self.layers if state.input_stats is not None), None)
        stats = first.input_stats if first is not None else None
        loss = torch.as_tensor(self.loss if self.loss is not None else math.nan, device=device,
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
        if self.loss is not None:
            self.loss = packed[-1]

    def layer_records(self, step: int, grad_norms: list[Tensor | None], grad_maxima: list[Tensor | None]) -> list[dict]:
        """One record per layer for the sampled step; all tensor results are read back in one sync."""
        count = len(self.params)
        weights = [p.detach() for p in self.params]
        olds = self.snapshot or []  # all parameters; none when no training forward ran in this sampled step
        old_norms = self.old_norms if self.old_norms is not None else kernels.norms(olds)  # ‖θ before the step‖
        kernels.subtract_(olds, weights)  # the snapshot buffers now hold -Δθ (they are refilled at the next sample)
        norms = kernels.norms(weights + olds)  # ‖θ‖ and ‖Δθ‖ in one fused call
        missing: list[Tensor | None] = [None] * count
        per_param: dict[str, list[Tensor | None]] = {
            "grad_norm": grad_norms, "grad_max": grad_maxima,
            "raw_grad_norm": [self.raw_norms.get(i) for i in range(count)],
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
        for state in self.layers:
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
        if isinstance(self.loss, Tensor):
            where["loss", 0] = len(tensors)
            tensors.append(self.loss)
        if isinstance(self.bad_loss_step, Tensor):
            where["bad_loss_step", 0] = len(tensors)
            tensors.append(self.bad_loss_step)
        numbers = kernels.read_back(tensors)
        loss = numbers[where["loss", 0]] if ("loss", 0) in where else self.loss
        assert loss is None or isinstance(loss, float)
        bad_loss = int(numbers[where["bad_loss_step", 0]]) if ("bad_loss_step", 0) in where else self.bad_loss_step
        self.bad_loss_step = -1

        def combined(key: str, layer: int, reduce: str) -> float | None:
            row = slots[key]
            values = [numbers[row[i]] for i in self.positions[layer] if row[i] >= 0]
            if not values:
                return None
            if reduce == "max":
                return math.nan if any(math.isnan(v) for v in values) else max(values)
            return math.sqrt(sum(v * v for v in values))

        records = []
        for state in self.layers:
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
                "step": step, "layer": state.name, "index": layer, "type": type(state.module).__name__,
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
                "loss_nonfinite_step": bad_loss if bad_loss >= 0 else None, "output_width": self.output_width,
                **inputs,
            })
        return records


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
