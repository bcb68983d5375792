"""``train_into``: train one model into a run directory with ``gradguard.train.Trainer`` (model from the zoo or any
model source, checked by a first pass before training; the gradient monitor on request) and write its run.json.

``gradguard.workflow`` re-exports it; ``gradguard train`` and the demo call it.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from ..layout import DIAGNOSIS_FILE, GRADFLOW_FILE
from .context import absolute_path, absolute_source, check_first_pass, device_record, test_split
from .staging import write_manifest


def train_into(run_dir: Path, dataset, *, model_name: str, model_kwargs: dict, method: str, threat, epochs: int,
               batch_size: int, optimizer: str, lr: float | None, clip_grad_norm: float | None,
               clip_grad_value: float | None, l2: float, train_samples: int | None, val_samples: int,
               val_attack: str | None, monitor_every: int | None, seed: int, device, label: str,
               extra: dict | None = None, order: int = 0, method_kwargs: dict | None = None,
               schedule: str = "constant", eps_warmup_epochs: float = 0.0, resume: bool = False,
               channels_last: bool = False, ema_decay: float | None = None,
               early_stop: str | None = None, on_finding: str | None = None,
               mean: Any = None, std: Any = None, logits: str | int | None = None) -> dict:
    """Train one model into ``run_dir`` with gradguard.train.Trainer; returns the manifest (with ``history``).

    ``model_name`` is a zoo name (built for the data's input shape and classes) or any spec
    ``gradguard.models.resolve`` takes (``package.module:callable``, ``torchvision:NAME``), called with
    ``model_kwargs``; either way model.json records how to rebuild it. ``mean``/``std`` normalise inputs inside the
    model (``Normalized``); ``logits`` selects the logits in an output that is not a tensor (``Logits``). One
    forward pass on two training samples checks model and data before any training (``check_first_pass``).

    ``run_dir`` is a fresh folder, or with ``resume`` one holding the checkpoints of an interrupted run with the same
    settings (the Trainer refuses different ones). Under torchrun the Trainer wraps the model in
    DistributedDataParallel (each rank trains on its share of every batch) and rank 0 alone writes."""
    import torch

    from ..attacks.base import prepare_model
    from ..io import atomic_write_json
    from ..models import MODELS, build_model, parse_stats, resolve
    from ..runtime import distributed
    from ..train import Trainer

    mean, std = parse_stats(mean, std)
    torch.manual_seed(seed)
    if model_name in MODELS:  # the zoo takes its input shape and class count from the data
        model = build_model(model_name, input_shape=list(dataset.input_shape), num_classes=dataset.num_classes,
                            mean=mean, std=std, **model_kwargs)
    else:  # package.module:callable, torchvision:NAME, ...: the factory's own keywords only
        model = resolve(model_name, mean=mean, std=std, **model_kwargs)
    prepare_model(model, device, channels_last=channels_last)
    first = check_first_pass(model, dataset, device, logits=logits, split="train")
    model = first.model
    x, y = dataset.x_train, dataset.y_train
    if train_samples is not None:
        x, y = x[:train_samples], y[:train_samples]
    val = test_split(dataset, val_samples)
    monitor = None
    if monitor_every:  # on every rank (the Trainer combines activation statistics across them); rank 0 writes
        from ..diagnostics import GradientMonitor
        from ..models import unwrap

        monitor = GradientMonitor(unwrap(model), every=monitor_every, on_finding=on_finding,
                                  path=run_dir / GRADFLOW_FILE if distributed.is_main_process() else None)
    trainer = Trainer(model, method, threat=threat if (method != "standard" or val_attack) else None, epochs=epochs,
                      batch_size=batch_size, optimizer=optimizer, lr=lr, clip_grad_norm=clip_grad_norm,
                      clip_grad_value=clip_grad_value, l2=l2, run_dir=run_dir, seed=seed, monitor=monitor,
                      val_attack=val_attack, val_max_samples=val_samples or 1000, device=device,
                      method_kwargs=method_kwargs, schedule=schedule, eps_warmup_epochs=eps_warmup_epochs,
                      metadata={"dataset": dataset.name}, progress=sys.stderr.isatty(), resume=resume,
                      ema_decay=ema_decay, early_stop=early_stop)
    started = time.perf_counter()
    with (monitor if monitor is not None else contextlib.nullcontext()):
        history = trainer.fit((x, y), val)
    record = device_record(device, channels_last=channels_last)
    splits = getattr(dataset, "split_info", None) or {}
    extra = dict(extra or {})
    if extra.get("data_root"):
        extra["data_root"] = absolute_path(extra["data_root"])
    fields = dict(
        kind="model", command="train", label=label, order=order, dataset=absolute_source(dataset.name),
        dataset_given=dataset.name, split=splits.get("train"), validation_split=splits.get("test"),
        classes=dataset.classes, class_source=getattr(dataset, "class_source", "") or None,
        input_shape=list(dataset.input_shape), model=model_name, model_kwargs=model_kwargs,
        mean=mean, std=std, model_output=first.output,
        method=method, method_kwargs=method_kwargs or {}, threat=threat.to_dict() if threat is not None else None,
        epochs=epochs, seed=seed, n_train=int(y.shape[0]), train_seconds=round(time.perf_counter() - started, 2),
        **record, **(extra or {}))
    if trainer.stopped is not None:
        fields["stopped"] = trainer.stopped

    def write() -> dict:
        manifest = write_manifest(run_dir, **fields)
        if monitor is not None and distributed.is_main_process():
            atomic_write_json(run_dir / DIAGNOSIS_FILE,
                              {"gradient_findings": [f.to_dict() for f in monitor.findings()]})
        return manifest

    manifest = distributed.rank0_first(write)
    manifest["history"] = history
    return manifest
