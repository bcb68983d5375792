"""The demo (``gradguard demo``): a suite run with a standard and a PGD-trained model, each attacked, evaluated
and checked for masking, then a deep sigmoid vs ReLU MLP under the gradient monitor, then the report. Its sizes
(``demo_settings``) are tiny with ``--quick`` and larger for real 28x28 data.

``gradguard.workflow`` re-exports the public names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..layout import GRADFLOW_DIR, MODELS_DIR, SUMMARY_FILE
from .attack import attack_into
from .console import timed
from .context import absolute_source, load_run_model
from .diagnose import diagnose_into
from .evaluate import evaluate_into
from .staging import read_manifest, staged_run_dir, write_manifest
from .train import train_into

DEMO_SETTINGS = {
    # full: well under two minutes on 2 idle CPU cores for digits (200 test images, the full standard suite)
    False: dict(epochs=20, at_epochs=20, batch_size=64, samples=200, suite="standard",
                curve=[0, 0.025, 0.05, 0.1, 0.15, 0.2], masking_samples=100, grad_epochs=4, grad_depth=8,
                grad_lr=0.05, train_samples=None),
    # quick: seconds, for tests
    True: dict(epochs=3, at_epochs=3, batch_size=64, samples=64, suite="quick", curve=[0, 0.1, 0.2],
               masking_samples=32, grad_epochs=1, grad_depth=6, grad_lr=0.05, train_samples=512),
}


# real 28x28 data with the fmnist-cnn: a 10k-image training subset and 5 epochs keep the full demo in minutes.
# The gradient experiment's SGD lr drops to 0.01 there: at 0.05 the 8-layer ReLU/He MLP really loses its units on
# Fashion-MNIST (3 seeds: one collapses to 20 % accuracy with 66-91 % of units dead over all 10k training inputs,
# two reach 72 % with 34-41 % of the first layer dead) and the monitor rightly says "dead"; at 0.01 it reaches
# 80-83 %, <= 3 % dead, no finding — so the demo's "fix" is healthy (docs/diagnose.md, "The demo's ReLU MLP").
DEMO_FMNIST = dict(epochs=5, at_epochs=5, train_samples=10000, samples=500, grad_lr=0.01)


def demo_settings(*, quick: bool, dataset: str, epochs: int | None = None, suite: Any = None) -> dict:
    """The demo's sizes: tiny with ``quick``, larger for real 28x28 data; ``epochs`` / ``suite`` override."""
    settings = dict(DEMO_SETTINGS[bool(quick)])
    if dataset != "digits" and not quick:
        settings.update(DEMO_FMNIST)
    if epochs is not None:
        settings.update(epochs=epochs, at_epochs=epochs)
    if suite is not None:
        settings.update(suite=suite)
    return settings


def demo_into(out: Path, dataset, threat, settings: dict, *, quick: bool, seed: int, device,
              force: bool = False) -> dict:
    """The end-to-end tour into the suite run ``out``: a standard and a PGD-trained model, each attacked,
    evaluated and checked for masking, then a deep sigmoid vs ReLU MLP under the gradient monitor, then the
    report. An earlier demo at ``out`` is replaced; any other folder only with ``force``. Returns summary.json."""
    from ..report import build_report
    from ..report.rundir import read_json

    replace = force or (read_manifest(out).get("command") == "demo" if out.is_dir() else False)
    model_name = "mlp" if dataset.input_shape[-1] <= 16 else "fmnist-cnn"
    with staged_run_dir(out, replace=replace) as staging:
        write_manifest(staging, kind="suite", command="demo", quick=bool(quick), dataset=absolute_source(dataset.name),
                       dataset_given=dataset.name, classes=dataset.classes, threat=threat.to_dict(), seed=seed,
                       settings=settings)
        for order, (label, method, epochs) in enumerate((("standard", "standard", settings["epochs"]),
                                                        ("adversarial", "pgd", settings["at_epochs"]))):
            _demo_model(staging / MODELS_DIR / label, dataset, threat, settings, label=label, method=method,
                        epochs=epochs, model_name=model_name, order=order, seed=seed, device=device)
        for order, (label, activation, init) in enumerate((("sigmoid-mlp", "sigmoid", "normal"),
                                                          ("relu-mlp", "relu", "he"))):
            with timed(f"[demo] gradient monitor on an MLP with {settings['grad_depth']} hidden {activation} layers "
                       f"+ an output layer ({init} init)"):
                train_into(staging / GRADFLOW_DIR / label, dataset, model_name="mlp",
                           model_kwargs={"depth": settings["grad_depth"], "width": 64, "activation": activation,
                                         "init": init},
                           method="standard", threat=None, epochs=settings["grad_epochs"], batch_size=32,
                           optimizer="sgd", lr=settings["grad_lr"], clip_grad_norm=None, clip_grad_value=None,
                           l2=0.0, train_samples=settings["train_samples"], val_samples=settings["samples"] or 500,
                           val_attack=None, monitor_every=5, seed=seed, device=device, label=label,
                           order=order, extra={"activation": activation, "init": init})
        with timed("[demo] writing the report"):
            build_report(staging, display_path=out)
    return read_json(out / SUMMARY_FILE)


def _demo_model(model_dir: Path, dataset, threat, settings: dict, *, label: str, method: str, epochs: int,
                model_name: str, order: int, seed: int, device) -> None:
    with timed(f"[demo] training the {label} model ({method}, {epochs} epochs)"):
        train_into(model_dir, dataset, model_name=model_name, model_kwargs={}, method=method, threat=threat,
                   epochs=epochs, batch_size=settings["batch_size"], optimizer="adam", lr=None,
                   clip_grad_norm=None, clip_grad_value=None, l2=0.0, train_samples=settings["train_samples"],
                   val_samples=settings["samples"] or 200, val_attack="pgd", monitor_every=None,
                   seed=seed, device=device, label=label, order=order)
    model = load_run_model(model_dir, device)
    with timed(f"[demo] attacking the {label} model with FGSM, BIM, PGD"):
        attack_into(model_dir, model, dataset, threat, ["fgsm", "bim", "pgd"], samples=settings["samples"],
                    batch_size=256, steps=None, seed=seed, device=device)
    with timed(f"[demo] evaluating the {label} model: {suite_name(settings['suite'])} suite, eps curve"):
        evaluate_into(model_dir, model, dataset, threat, suite=settings["suite"], samples=settings["samples"],
                      batch_size=256, curve=settings["curve"], curve_suite="quick", seed=seed, device=device)
    with timed(f"[demo] gradient-masking checklist on the {label} model"):
        diagnose_into(model_dir, model, dataset, threat, samples=settings["masking_samples"],
                      curvature=False, seed=seed, device=device)


def suite_name(suite) -> str:
    if isinstance(suite, str):
        return repr(suite)
    return "[" + ", ".join(str(s.get("label", s.get("name"))) if isinstance(s, dict) else str(s) for s in suite) + "]"
