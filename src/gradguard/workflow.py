"""Train, attack, evaluate and diagnose a model INTO a run directory — the work behind every CLI command.

A *run directory* (layout: ``gradguard.report.rundir``) holds one model and everything measured on it, so that
``gradguard report`` can rebuild the report at any time. The functions here are what the ``gradguard`` commands
call; they are plain Python, so a script or a notebook can build the same run directories::

    from gradguard import workflow
    with workflow.staged_run_dir("runs/pgd") as staging:
        workflow.train_into(staging, workflow.load_data("digits"), model_name="mlp", method="pgd", ...)
    model = workflow.load_run_model(Path("runs/pgd"), "cpu")
    workflow.attack_into(Path("runs/pgd"), model, dataset, threat, ["fgsm", "pgd"], samples=500, ...)

Files are never half-written: a new run directory is built in a staging folder and renamed into place on
success (``staged_run_dir``); results added to an existing run are written atomically after all the work.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from .errors import CheckpointError, ConfigError, GradguardError

DEFAULT_EPS = {"linf": 0.1, "l2": 1.0, "l1": 5.0}
# name -> (class name in gradguard.attacks, default keyword arguments); classes that have not landed are skipped.
ATTACKS: dict[str, tuple[str, dict]] = {
    "fgsm": ("FGSM", {}), "bim": ("BIM", {}), "pgd": ("PGD", {}), "mifgsm": ("MIFGSM", {}),
    "apgd-ce": ("APGD", {"loss": "ce"}), "apgd-dlr": ("APGD", {"loss": "dlr"}), "apgd-t": ("APGDT", {}),
    "cw": ("CW", {}), "deepfool": ("DeepFool", {}), "square": ("Square", {}),
}
EXAMPLES_SHOWN = 8
JOURNAL_FILE = "robustness.journal.jsonl"  # evaluate's per-block journal, while an evaluation is unfinished


# ================================================================================================
# Progress, devices
# ================================================================================================
def log(message: str) -> None:
    """Progress notes go to stderr so that stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)


def progress(iterable, **kwargs):
    """tqdm on a terminal (stderr), silent otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None, leave=False, file=sys.stderr, **kwargs)


@contextlib.contextmanager
def timed(message: str) -> Iterator[None]:
    """Log ``message`` to stderr, then how long the block took."""
    log(message)
    started, cpu = time.perf_counter(), time.process_time()
    yield
    log(f"        ... {time.perf_counter() - started:.1f} s ({time.process_time() - cpu:.1f} s CPU)")


def resolve_device(name: str | None) -> Any:
    """``auto`` (or None) picks CUDA when available; anything else must be a device torch knows and has."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here; use --device cpu")
    return device


# ================================================================================================
# Run directories: staging, manifests
# ================================================================================================
class KeptPartialRun(KeyboardInterrupt):
    """Ctrl-C during a resumable command whose finished work was kept for ``--resume``."""


@contextlib.contextmanager
def staged_run_dir(out: str | Path, *, replace: bool = False, resumable: bool = False,
                   resume: bool = False) -> Iterator[Path]:
    """Build a new run directory in a temporary sibling folder and rename it to ``out`` only on success.

    On any error (or Ctrl-C) the temporary folder is removed, so ``out`` is either complete or untouched.
    ``resumable`` (training) stages in ``.<name>.partial`` instead and keeps that folder when it already holds a
    checkpoint, so that ``resume=True`` (``--resume``) continues the run; ``out`` itself still appears only complete.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise ConfigError(f"out: {str(out)!r} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {str(out)!r} exists and is not a directory; choose another --out")
    partial = out.parent / f".{out.name}.partial"
    if resume and not partial.is_dir():
        raise ConfigError(f"resume: no interrupted run of {str(out)!r} to continue (looked for {str(partial)!r}); "
                          "run without --resume to start one")
    if resumable and partial.exists() and not resume:
        if not replace:
            raise ConfigError(f"out: an interrupted run of {str(out)!r} is kept in {str(partial)!r}; continue it "
                              "with --resume, or pass --force to start over")
        shutil.rmtree(partial)
    staging = _make_staging(out, partial if resumable else None)
    try:
        yield staging
        _move_into_place(staging, out)
    except BaseException as error:
        if not (resumable and _holds_resumable_work(staging)):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        hint = f"the finished work is kept in {str(staging)!r}; add --resume to the same command to continue"
        if isinstance(error, GradguardError):
            raise type(error)(f"{one_line(error)}; {hint}") from error
        if isinstance(error, KeyboardInterrupt):
            raise KeptPartialRun(hint) from None
        raise


def _make_staging(out: Path, partial: Path | None) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial is not None:
            partial.mkdir(exist_ok=True)
            return partial
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise ConfigError(f"out: cannot create a run directory next to {str(out)!r} ({error.strerror or error}); "
                          "choose a writable --out") from None


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def _holds_resumable_work(run_dir: Path) -> bool:
    """A training checkpoint or an evaluation journal: work that ``--resume`` can continue."""
    from .train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoint") is not None or holds_journal(run_dir)


def holds_journal(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the journal of an unfinished evaluation (also the per-rank files of torchrun)."""
    from .evaluation.journal import journal_files

    return any(f.is_file() and f.stat().st_size > 0 for f in journal_files(run_dir / JOURNAL_FILE))


def check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not writable; fix its permissions or copy the run elsewhere")


def write_manifest(run_dir: Path, **fields) -> dict:
    """run.json: what made the run (command, dataset, model, threat, seed, versions), written atomically."""
    from .io import atomic_write_json

    manifest = {"format": "gradguard-run", "gradguard": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    atomic_write_json(run_dir / "run.json", manifest)
    return manifest


def read_manifest(run_dir: Path) -> dict:
    from .report.rundir import read_json

    return read_json(run_dir / "run.json") or {}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ================================================================================================
# What a command works on: data, threat, model, attacks
# ================================================================================================
def load_data(name: str, root: str | None = None, *, resize: Any = None, center_crop: Any = None):
    """Both splits of a dataset in memory (``gradguard.data.load_dataset``): for training."""
    from .data import load_dataset

    return load_dataset(name, root=root, resize=resize, center_crop=center_crop)


def open_test_split(name: str, root: str | None = None, *, resize: Any = None, center_crop: Any = None):
    """The test split as a streamed ``SampleSet`` (``gradguard.data.open_split``): read batch by batch, never whole."""
    from .data import open_split

    return open_split(name, "test", root, resize=resize, center_crop=center_crop)


def test_samples(dataset):
    """The test split as a ``SampleSet``: an opened split as it is, an in-memory ``Dataset``'s test tensors wrapped."""
    from .data import SampleSet, TensorSampleSet

    if isinstance(dataset, SampleSet):
        return dataset
    return TensorSampleSet(dataset.name, dataset.classes, dataset.x_test, dataset.y_test)


def test_split(dataset, samples: int | None):
    """The first ``samples`` test images and labels (all when None) of an in-memory ``Dataset``."""
    x, y = dataset.x_test, dataset.y_test
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return x, y


def iter_batches(samples, batch_size: int, limit: int | None = None) -> Iterator[tuple[Any, Any]]:
    """(x, y) batches of the first ``limit`` samples (all when None) of a ``SampleSet``, in order."""
    import numpy as np

    count = len(samples) if limit is None else min(limit, len(samples))
    for start in range(0, count, batch_size):
        yield samples.get_batch(np.arange(start, min(start + batch_size, count)))


def make_threat_from(norm: str | None, eps: float | None):
    from .threat import make_threat

    norm = (norm or "linf").lower()
    return make_threat(norm, DEFAULT_EPS.get(norm, 0.1) if eps is None else eps)


def run_threat(run_dir: Path, norm: str | None, eps: float | None):
    """The threat given on the command line, else the one the run was trained against, else the default."""
    from .threat import threat_from_dict

    stored = read_manifest(run_dir).get("threat")
    if norm is None and eps is None and isinstance(stored, dict):
        return threat_from_dict(stored)
    if norm is None:
        norm = stored.get("norm", "linf") if isinstance(stored, dict) else "linf"
    return make_threat_from(norm, eps)


def load_run_model(run_dir: Path, device):
    """The model saved in ``run_dir`` (model.safetensors + model.json), in eval mode on ``device``."""
    from .models import load

    if not run_dir.exists():
        raise CheckpointError(f"run_dir: no run directory at {str(run_dir)!r}; train one with `gradguard train --out "
                              f"{run_dir}` first")
    if not (run_dir / "model.safetensors").exists() and (run_dir / "models").is_dir():
        choices = sorted(str(p) for p in (run_dir / "models").iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(f"run_dir: {str(run_dir)!r} is a suite run holding several models; pass one of {choices}")
    return load(run_dir, map_location=device).eval()


def run_dataset(run_dir: Path, dataset: str | None, data_root: str | None, *, resize: Any = None,
                center_crop: Any = None):
    """The test split (streamed) of the dataset named on the command line, else the run's own (run.json, with its
    data root, resize and crop), else digits."""
    manifest = read_manifest(run_dir)
    if dataset is None:
        resize = resize if resize is not None else manifest.get("resize")
        center_crop = center_crop if center_crop is not None else manifest.get("center_crop")
    return open_test_split(dataset or manifest.get("dataset") or "digits", data_root or manifest.get("data_root"),
                           resize=resize, center_crop=center_crop)


def resolve_model(spec: str, *, weights: str | None = None, kwargs: dict | None = None,
                  mean: str | float | Sequence[float] | None = None, std: str | float | Sequence[float] | None = None,
                  device: Any = "cpu"):
    """Any model gradguard.models.resolve accepts (``package.module:callable`` + weights, ``torchvision:NAME``,
    a run directory, a .safetensors file), in eval mode on ``device``."""
    from .models import resolve

    return resolve(spec, weights, mean=mean, std=std, map_location=device, **(kwargs or {})).eval()


def start_model_run(run_dir: Path, model, *, dataset, dataset_name: str, data_root: str | None, threat, seed: int,
                    command: str, label: str, resize: Any = None, center_crop: Any = None) -> dict:
    """Make ``run_dir`` a model run for a model that gradguard did not train: its weights and the source it was
    resolved from (model.safetensors + model.json, so ``load_run_model`` rebuilds it) and run.json, which also
    records the data (name, root, resize, crop) so later commands on the run directory reopen the same split."""
    from .models import describe_source, model_source, save

    source = model_source(model)
    save(model, run_dir, dataset=dataset_name)
    return write_manifest(
        run_dir, kind="model", command=command, label=label, dataset=dataset_name, data_root=data_root,
        resize=resize, center_crop=center_crop, classes=list(dataset.classes), input_shape=list(dataset.input_shape),
        threat=threat.to_dict(), seed=seed, model_source=source, model_source_text=describe_source(source))


def available_attacks() -> list[str]:
    from . import attacks

    return [name for name, (cls, _) in ATTACKS.items() if hasattr(attacks, cls)]


def make_attack(name: str, model, threat, *, seed: int, steps: int | None = None):
    """An attack by its CLI name (see ``ATTACKS``) with its defaults, ``seed`` and optionally ``steps``."""
    from . import attacks

    if name not in ATTACKS:
        raise ConfigError(f"attack: unknown attack {name!r}; choose from {available_attacks()}")
    class_name, defaults = ATTACKS[name]
    if not hasattr(attacks, class_name):
        raise ConfigError(f"attack: {name!r} ({class_name}) is not available in this build; choose from "
                          f"{available_attacks()}")
    kwargs = dict(defaults, seed=seed)
    if steps is not None and name != "fgsm":
        kwargs["steps"] = steps
    return getattr(attacks, class_name)(model, threat, **kwargs)


# ================================================================================================
# train / attack / evaluate / diagnose INTO a run directory
# ================================================================================================
def train_into(run_dir: Path, dataset, *, model_name: str, model_kwargs: dict, method: str, threat, epochs: int,
               batch_size: int, optimizer: str, lr: float | None, clip_grad_norm: float | None,
               clip_grad_value: float | None, l2: float, train_samples: int | None, val_samples: int,
               val_attack: str | None, monitor_every: int | None, seed: int, device, label: str,
               extra: dict | None = None, order: int = 0, method_kwargs: dict | None = None,
               schedule: str = "constant", eps_warmup_epochs: float = 0.0, resume: bool = False) -> dict:
    """Train one model into ``run_dir`` with gradguard.train.Trainer; returns the manifest (with ``history``).

    ``model_name`` is a zoo name (built for the data's input shape and classes) or any spec
    ``gradguard.models.resolve`` takes (``package.module:callable``, ``torchvision:NAME``), called with
    ``model_kwargs``; either way model.json records how to rebuild it.

    ``run_dir`` is a fresh folder, or with ``resume`` one holding the checkpoints of an interrupted run with the same
    settings (the Trainer refuses different ones)."""
    import torch

    from .io import atomic_write_json
    from .models import MODELS, build_model, resolve
    from .train import Trainer

    torch.manual_seed(seed)
    if model_name in MODELS:  # the zoo takes its input shape and class count from the data
        model = build_model(model_name, input_shape=list(dataset.input_shape), num_classes=dataset.num_classes,
                            **model_kwargs)
    else:  # package.module:callable, torchvision:NAME, ...: the factory's own keywords only
        model = resolve(model_name, **model_kwargs)
    x, y = dataset.x_train, dataset.y_train
    if train_samples is not None:
        x, y = x[:train_samples], y[:train_samples]
    val = test_split(dataset, val_samples)
    monitor = None
    if monitor_every:
        from .diagnostics import GradientMonitor

        monitor = GradientMonitor(model, every=monitor_every, path=run_dir / "gradflow.jsonl")
    trainer = Trainer(model, method, threat=threat if (method != "standard" or val_attack) else None, epochs=epochs,
                      batch_size=batch_size, optimizer=optimizer, lr=lr, clip_grad_norm=clip_grad_norm,
                      clip_grad_value=clip_grad_value, l2=l2, run_dir=run_dir, seed=seed, monitor=monitor,
                      val_attack=val_attack, val_max_samples=val_samples or 1000, device=device,
                      method_kwargs=method_kwargs, schedule=schedule, eps_warmup_epochs=eps_warmup_epochs,
                      metadata={"dataset": dataset.name}, progress=sys.stderr.isatty(), resume=resume)
    started = time.perf_counter()
    with (monitor if monitor is not None else contextlib.nullcontext()):
        history = trainer.fit((x, y), val)
    manifest = write_manifest(
        run_dir, kind="model", command="train", label=label, order=order, dataset=dataset.name,
        classes=dataset.classes, input_shape=list(dataset.input_shape), model=model_name, model_kwargs=model_kwargs,
        method=method, method_kwargs=method_kwargs or {}, threat=threat.to_dict() if threat is not None else None,
        epochs=epochs, seed=seed,
        n_train=int(y.shape[0]), train_seconds=round(time.perf_counter() - started, 2), **(extra or {}))
    if monitor is not None:
        atomic_write_json(run_dir / "diagnosis.json",
                          {"gradient_findings": [f.to_dict() for f in monitor.findings()]})
    manifest["history"] = history
    return manifest


def attack_into(run_dir: Path, model, dataset, threat, names: Sequence[str], *, samples: int | None, batch_size: int,
                steps: int | None, seed: int, device) -> dict:
    """Run single attacks on the test split, batch by batch; add their results to attacks.json; examples.npz.

    Only per-sample numbers (correct, distance) and the few images the report shows are kept, never the whole
    adversarial set. attacks.json keeps results per threat: earlier results at another norm or eps move to its
    ``other_threats`` list instead of being dropped. Returns what it wrote to attacks.json.
    """
    from .io import atomic_write_bytes, atomic_write_json
    from .report.rundir import read_json

    attacks = [(name, make_attack(name, model, threat, seed=seed, steps=steps)) for name in names]  # validate first
    data = test_samples(dataset)
    labels, clean_pred = _clean_predictions(model, data, samples, batch_size, device)
    results: dict[str, dict] = {}
    examples: ExamplePicker | None = None
    for name, attack in attacks:
        examples = ExamplePicker(name, clean_pred == labels)
        results[name] = _run_attack(attack, name, data, samples, labels, clean_pred, threat, batch_size, device,
                                    examples)
    group = {"threat": threat.to_dict(), "n_samples": int(len(labels)),
             "clean_accuracy": float((clean_pred == labels).float().mean()), "labels": labels.tolist(),
             "results": results}
    payload = merge_attack_results(read_json(run_dir / "attacks.json"), group, dataset.name)
    assert examples is not None  # names is never empty: make_attack validated at least one
    buffer = examples.npz_bytes(clean_pred, data.classes)
    atomic_write_json(run_dir / "attacks.json", payload)
    atomic_write_bytes(run_dir / "examples.npz", buffer)
    return payload


def _clean_predictions(model, data, samples: int | None, batch_size: int, device):
    import torch

    labels, predictions = [], []
    with torch.no_grad():
        for xb, yb in iter_batches(data, batch_size, samples):
            predictions.append(model(xb.to(device)).argmax(1).cpu())
            labels.append(yb.cpu())
    return torch.cat(labels), torch.cat(predictions)


def _run_attack(attack, name: str, data, samples: int | None, labels, clean_pred, threat, batch_size: int, device,
                examples: "ExamplePicker") -> dict:
    import torch

    started = time.perf_counter()
    correct, distance, n_grad, offset = [], [], 0, 0
    batches = iter_batches(data, batch_size, samples)
    for xb, yb in progress(batches, desc=name, total=-(-len(labels) // batch_size)):
        result = attack.run(xb.to(device), yb.to(device))
        x_adv, pred_adv = result.x_adv.detach().cpu(), result.predictions.cpu()
        correct.append(pred_adv == yb.cpu())
        distance.append(threat.distance(x_adv, xb.cpu()))
        examples.offer(offset, xb.cpu(), x_adv, yb.cpu(), pred_adv)
        n_grad += int(result.n_grad)
        offset += len(yb)
    correct_all, distance_all = torch.cat(correct), torch.cat(distance)
    clean_correct = clean_pred == labels
    return {
        "robust_accuracy": float(correct_all.float().mean()),
        "success_rate": float((~correct_all & clean_correct).sum() / max(1, int(clean_correct.sum()))),
        "mean_distance": float(distance_all.mean()), "max_distance": float(distance_all.max()),
        "n_grad": round(n_grad / max(1, len(labels)), 2), "elapsed_s": round(time.perf_counter() - started, 3),
        "threat": threat.to_dict(), "params": _attack_params(attack),
        "correct": correct_all.int().tolist(),  # per sample, for the worst case across commands
    }


class ExamplePicker:
    """Keeps the first few correctly classified images (else the first few) of an attack for the report's grid."""

    def __init__(self, attack: str, clean_correct) -> None:
        self.attack, self.clean_correct = attack, clean_correct
        self.kept: list[tuple[int, Any, Any, Any, Any]] = []  # (index, x, x_adv, y, pred_adv)
        self.first: list[tuple[int, Any, Any, Any, Any]] = []

    def offer(self, offset: int, x, x_adv, y, pred_adv) -> None:
        for i in range(len(y)):
            item = (offset + i, x[i], x_adv[i], y[i], pred_adv[i])
            if len(self.first) < EXAMPLES_SHOWN:
                self.first.append(item)
            if len(self.kept) < EXAMPLES_SHOWN and bool(self.clean_correct[offset + i]):
                self.kept.append(item)

    def npz_bytes(self, clean_pred, classes: Sequence[str]) -> bytes:
        import numpy as np
        import torch

        chosen = self.kept or self.first
        index = torch.tensor([item[0] for item in chosen], dtype=torch.long)
        return _npz_bytes(x=torch.stack([c[1] for c in chosen]).numpy(), x_adv=torch.stack([c[2] for c in chosen]).numpy(),
                          y=torch.stack([c[3] for c in chosen]).numpy(), pred=clean_pred[index].numpy(),
                          pred_adv=torch.stack([c[4] for c in chosen]).numpy(), index=index.numpy(),
                          classes=np.array(list(classes)), attack=np.array(self.attack))


def merge_attack_results(previous: dict | None, group: dict, dataset: str) -> dict:
    """attacks.json after a new attack run: ``group`` on top; earlier results at the same threat and samples merged
    in, results at other threats kept in ``other_threats`` (each with its own threat, samples and results)."""
    from .report.rundir import attack_groups, same_threat

    others = []
    for old in attack_groups(previous):
        if same_threat(old.get("threat"), group["threat"]):
            if old.get("labels") == group["labels"]:
                group = {**group, "results": {**(old.get("results") or {}), **group["results"]}}
            continue  # the same threat on other samples: replaced by the new run
        others.append(old)
    return {**group, "dataset": dataset, "other_threats": others}


def evaluate_into(run_dir: Path, model, dataset, threat, *, suite, samples: int | None, batch_size: int,
                  curve: list[float] | None, curve_suite, seed: int, device, resume: bool = False) -> dict:
    """gradguard.evaluation.evaluate (+ evaluate_curve) on the first ``samples`` test samples, streamed batch by
    batch; write robustness.json (+ curve.json) atomically at the end.

    Each finished batch is journaled to ``run_dir/robustness.journal.jsonl``; after an interruption, ``resume=True``
    continues from the journal (a journal from another model, suite, threat or data is refused) and ends with the
    report of an uninterrupted run. The journal is removed once robustness.json is written."""
    from .evaluation import evaluate, evaluate_curve
    from .evaluation.journal import remove_journals
    from .io import atomic_write_json

    data = test_samples(dataset)
    if resume and not holds_journal(run_dir):
        raise ConfigError(f"resume: no unfinished evaluation in {str(run_dir)!r} (no {JOURNAL_FILE}); run without "
                          "--resume")
    suite, note = runnable_suite(suite, threat)
    curve_suite, curve_note = runnable_suite(curve_suite, threat)
    model = model.to(device)
    report = evaluate(model, data, threat, suite=suite, batch_size=batch_size, seed=seed, max_samples=samples,
                      progress=sys.stderr.isatty(), journal=run_dir / JOURNAL_FILE, resume=resume)
    robustness = _with_class_names(report.to_dict(), data.classes)
    if note:
        robustness["fallback"] = note
    atomic_write_json(run_dir / "robustness.json", robustness)
    remove_journals(run_dir / JOURNAL_FILE)
    curve_data = None
    if curve:
        curve_data = evaluate_curve(model, data, threat, curve, suite=curve_suite, batch_size=batch_size,
                                    seed=seed, max_samples=samples, progress=sys.stderr.isatty()).to_dict()
        if curve_note:
            curve_data["fallback"] = curve_note
        atomic_write_json(run_dir / "curve.json", curve_data)
    return {"robustness": robustness, "curve": curve_data}


def runnable_suite(suite, threat) -> tuple[Any, str | None]:
    """The suite itself when all its attacks are installed; else (a named suite only) the "classic" FGSM + PGD-40
    suite and a note saying so, which goes into robustness.json and the report."""
    from .evaluation import resolve_suite

    try:
        for spec in resolve_suite(suite):
            spec.supports(threat)  # imports the attack class
    except ConfigError as error:
        if not isinstance(suite, str) or "not available" not in str(error):
            raise
        note = (f"suite {suite!r} needs attacks that are not installed ({one_line(error)}); "
                "ran the 'classic' suite (FGSM, PGD-40) instead, which overestimates robustness")
        log(f"[gradguard] warning: {note}")
        return "classic", note
    return suite, None


def diagnose_into(run_dir: Path, model, dataset, threat, *, samples: int, curvature: bool, seed: int, device) -> dict:
    """Masking checklist (masking.json) + gradient findings from gradflow.jsonl + curvature (diagnosis.json)."""
    from .diagnostics import check_masking
    from .io import atomic_write_json, atomic_write_text
    from .report.rundir import read_json, read_jsonl

    data = test_samples(dataset)
    masking = check_masking(model, data, threat, n_samples=samples, seed=seed)
    diagnosis = dict(read_json(run_dir / "diagnosis.json") or {})
    records = read_jsonl(run_dir / "gradflow.jsonl")
    if records:
        from .diagnostics import findings_from_records

        diagnosis["gradient_findings"] = [f.to_dict() for f in findings_from_records(records)]
    if curvature:
        from .diagnostics.curvature import input_curvature, top_hessian_eigenvalue

        xb, yb = next(iter_batches(data, min(64, samples)))
        xb, yb = xb.to(device), yb.to(device)
        diagnosis["curvature"] = {"top_hessian_eigenvalue": float(top_hessian_eigenvalue(model, xb, yb)),
                                  "input_curvature_mean": float(input_curvature(model, xb, yb).mean()),
                                  "n_samples": int(len(yb))}
    diagnosis["masking_verdict"] = masking.verdict
    atomic_write_text(run_dir / "masking.json", masking.to_json())
    atomic_write_json(run_dir / "diagnosis.json", diagnosis)
    return {"masking": json.loads(masking.to_json()), "diagnosis": diagnosis}


def _with_class_names(robustness: dict, classes: list[str]) -> dict:
    per_class = robustness.get("per_class")
    if isinstance(per_class, dict) and all(str(k).isdigit() and int(k) < len(classes) for k in per_class):
        robustness["per_class"] = {classes[int(k)]: v for k, v in per_class.items()}
    return robustness


def _attack_params(attack) -> dict:
    keep = ("steps", "step_size", "restarts", "random_start", "init", "loss", "decay", "rho", "queries")
    return {k: getattr(attack, k) for k in keep if isinstance(getattr(attack, k, None), (int, float, str, bool))}


def _npz_bytes(**arrays) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


# ================================================================================================
# The demo: a suite run with two models and two gradient experiments
# ================================================================================================
DEMO_SETTINGS = {
    # full: well under two minutes on 2 idle CPU cores for digits (200 test images, the full standard suite)
    False: dict(epochs=20, at_epochs=20, batch_size=64, samples=200, suite="standard",
                curve=[0, 0.025, 0.05, 0.1, 0.15, 0.2], masking_samples=100, grad_epochs=4, grad_depth=8,
                train_samples=None),
    # quick: seconds, for tests
    True: dict(epochs=3, at_epochs=3, batch_size=64, samples=64, suite="quick", curve=[0, 0.1, 0.2],
               masking_samples=32, grad_epochs=1, grad_depth=6, train_samples=512),
}
# real 28x28 data with the fmnist-cnn: a 10k-image training subset and 5 epochs keep the full demo in minutes
DEMO_FMNIST = dict(epochs=5, at_epochs=5, train_samples=10000, samples=500)


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
    from .report import build_report
    from .report.rundir import read_json

    replace = force or (read_manifest(out).get("command") == "demo" if out.is_dir() else False)
    model_name = "mlp" if dataset.input_shape[-1] <= 16 else "fmnist-cnn"
    with staged_run_dir(out, replace=replace) as staging:
        write_manifest(staging, kind="suite", command="demo", quick=bool(quick), dataset=dataset.name,
                       classes=dataset.classes, threat=threat.to_dict(), seed=seed, settings=settings)
        for order, (label, method, epochs) in enumerate((("standard", "standard", settings["epochs"]),
                                                        ("adversarial", "pgd", settings["at_epochs"]))):
            _demo_model(staging / "models" / label, dataset, threat, settings, label=label, method=method,
                        epochs=epochs, model_name=model_name, order=order, seed=seed, device=device)
        for order, (label, activation, init) in enumerate((("sigmoid-mlp", "sigmoid", "normal"),
                                                          ("relu-mlp", "relu", "he"))):
            with timed(f"[demo] gradient monitor on a {settings['grad_depth']}-layer {activation} MLP ({init} init)"):
                train_into(staging / "gradflow" / label, dataset, model_name="mlp",
                           model_kwargs={"depth": settings["grad_depth"], "width": 64, "activation": activation,
                                         "init": init},
                           method="standard", threat=None, epochs=settings["grad_epochs"], batch_size=32,
                           optimizer="sgd", lr=0.05, clip_grad_norm=None, clip_grad_value=None, l2=0.0,
                           train_samples=settings["train_samples"], val_samples=settings["samples"] or 500,
                           val_attack=None, monitor_every=5, seed=seed, device=device, label=label,
                           order=order, extra={"activation": activation, "init": init})
        with timed("[demo] writing the report"):
            build_report(staging, display_path=out)
    return read_json(out / "summary.json")


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
