"""The ``gradguard`` command line: demo | train | attack | evaluate | diagnose | report | list.

Built on argparse (standard library, no dependency; see docs/cli.md). Every command reads or writes a run
directory (layout: ``gradguard.report.rundir``), prints a short table (or JSON with ``--json``), shows progress
bars on long work, and takes ``--seed``, ``--device`` and ``--config FILE``.

Errors: a ``GradguardError`` or a bad argument exits non-zero with one line on stderr and no traceback. New run
directories are built in a temporary folder next to the target and renamed at the end, so a failed command
leaves nothing half-written; commands that add results to an existing run write each file atomically, after
all the work is done.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
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

EXIT_ERROR = 1
EXIT_USAGE = 2
DEFAULT_EPS = {"linf": 0.1, "l2": 1.0, "l1": 5.0}
# name -> (class name in gradguard.attacks, default keyword arguments); classes that have not landed are skipped.
ATTACKS: dict[str, tuple[str, dict]] = {
    "fgsm": ("FGSM", {}), "bim": ("BIM", {}), "pgd": ("PGD", {}), "mifgsm": ("MIFGSM", {}),
    "apgd-ce": ("APGD", {"loss": "ce"}), "apgd-dlr": ("APGD", {"loss": "dlr"}), "apgd-t": ("APGDT", {}),
    "cw": ("CW", {}), "deepfool": ("DeepFool", {}), "square": ("Square", {}),
}
EXAMPLES_SHOWN = 8


# ================================================================================================
# Small shared pieces: output, run directories, devices
# ================================================================================================
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other gradguard error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def log(message: str) -> None:
    """Progress notes go to stderr so that stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def progress(iterable, **kwargs):
    """tqdm on a terminal (stderr), silent otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None, leave=False, file=sys.stderr, **kwargs)


def resolve_device(name: str | None) -> "Any":
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


class KeptPartialRun(KeyboardInterrupt):
    """Ctrl-C during a resumable command whose finished epochs were kept for ``--resume``."""


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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if resumable:
            partial.mkdir(exist_ok=True)
            staging = partial
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise ConfigError(f"out: cannot create a run directory next to {str(out)!r} ({error.strerror or error}); "
                          "choose a writable --out") from None
    try:
        yield staging
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException as error:
        if not (resumable and _holds_checkpoint(staging)):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        hint = f"the finished epochs are kept in {str(staging)!r}; add --resume to the same command to continue"
        if isinstance(error, GradguardError):
            raise type(error)(f"{_one_line(error)}; {hint}") from error
        if isinstance(error, KeyboardInterrupt):
            raise KeptPartialRun(hint) from None
        raise


def _holds_checkpoint(run_dir: Path) -> bool:
    from .train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoint") is not None


@contextlib.contextmanager
def timed(message: str) -> Iterator[None]:
    """Log ``message`` to stderr, then how long the block took."""
    log(message)
    started, cpu = time.perf_counter(), time.process_time()
    yield
    log(f"        ... {time.perf_counter() - started:.1f} s ({time.process_time() - cpu:.1f} s CPU)")


def check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not writable; fix its permissions or copy the run elsewhere")


def write_manifest(run_dir: Path, **fields) -> dict:
    from .io import atomic_write_json

    manifest = {"format": "gradguard-run", "gradguard": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    atomic_write_json(run_dir / "run.json", manifest)
    return manifest


def read_manifest(run_dir: Path) -> dict:
    from .report.rundir import read_json

    return read_json(run_dir / "run.json") or {}


def parse_eps_list(text: str | Sequence[float]) -> list[float]:
    values = text if isinstance(text, (list, tuple)) else [v for v in str(text).split(",") if v.strip()]
    try:
        eps = [float(v) for v in values]
    except ValueError:
        raise ConfigError(f"curve: expected comma-separated numbers such as 0,0.05,0.1, got {text!r}") from None
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ConfigError(f"curve: eps values must be finite and >= 0, got {text!r}")
    return sorted(set(eps))


def parse_names(text: str | Sequence[str], argument: str) -> list[str]:
    names = list(text) if isinstance(text, (list, tuple)) else [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{argument}: give at least one name")
    return names


# ================================================================================================
# Building blocks shared by the commands and the demo
# ================================================================================================
def load_data(name: str, root: str | None = None):
    from .data import load_dataset

    return load_dataset(name, root=root)


def test_split(dataset, samples: int | None):
    x, y = dataset.x_test, dataset.y_test
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return x, y


def make_threat_from(norm: str, eps: float | None):
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
    from .models import load

    if not run_dir.exists():
        raise CheckpointError(f"run_dir: no run directory at {str(run_dir)!r}; train one with `gradguard train --out "
                              f"{run_dir}` first")
    if not (run_dir / "model.safetensors").exists() and (run_dir / "models").is_dir():
        choices = sorted(str(p) for p in (run_dir / "models").iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(f"run_dir: {str(run_dir)!r} is a suite run holding several models; pass one of {choices}")
    return load(run_dir, map_location=device).eval()


def run_dataset(run_dir: Path, dataset: str | None, data_root: str | None):
    manifest = read_manifest(run_dir)
    return load_data(dataset or manifest.get("dataset") or "digits", data_root or manifest.get("data_root"))


def available_attacks() -> list[str]:
    from . import attacks

    return [name for name, (cls, _) in ATTACKS.items() if hasattr(attacks, cls)]


def make_attack(name: str, model, threat, *, seed: int, steps: int | None = None):
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


def train_into(run_dir: Path, dataset, *, model_name: str, model_kwargs: dict, method: str, threat, epochs: int,
               batch_size: int, optimizer: str, lr: float | None, clip_grad_norm: float | None,
               clip_grad_value: float | None, l2: float, train_samples: int | None, val_samples: int,
               val_attack: str | None, monitor_every: int | None, seed: int, device, label: str,
               extra: dict | None = None, order: int = 0, method_kwargs: dict | None = None,
               schedule: str = "constant", eps_warmup_epochs: float = 0.0, resume: bool = False) -> dict:
    """Train one model into ``run_dir`` with gradguard.train.Trainer; returns the manifest.

    ``run_dir`` is a fresh folder, or with ``resume`` one holding the checkpoints of an interrupted run with the same
    settings (the Trainer refuses different ones)."""
    import torch

    from .io import atomic_write_json
    from .models import build_model
    from .train import Trainer

    torch.manual_seed(seed)
    model = build_model(model_name, input_shape=list(dataset.input_shape), num_classes=dataset.num_classes,
                        **model_kwargs)
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
    """Run single attacks on the test split; write attacks.json and examples.npz (of the last attack)."""
    import numpy as np
    import torch

    from .io import atomic_write_bytes, atomic_write_json
    from .report.rundir import read_json

    attacks = [(name, make_attack(name, model, threat, seed=seed, steps=steps)) for name in names]  # validate first
    x, y = test_split(dataset, samples)
    clean_pred = predict(model, x, batch_size, device)
    results, last_adv = {}, None
    for name, attack in attacks:
        started = time.perf_counter()
        x_adv, pred_adv, n_grad = [], [], 0
        for start in progress(range(0, len(y), batch_size), desc=name):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            result = attack.run(xb, yb)
            x_adv.append(result.x_adv.detach().cpu())
            pred_adv.append(result.predictions.cpu())
            n_grad += int(result.n_grad)
        x_adv_all, pred_adv_all = torch.cat(x_adv), torch.cat(pred_adv)
        distance = threat.distance(x_adv_all, x)
        correct = pred_adv_all == y
        results[name] = {
            "robust_accuracy": float(correct.float().mean()),
            "success_rate": float((~correct & (clean_pred == y)).sum() / max(1, int((clean_pred == y).sum()))),
            "mean_distance": float(distance.mean()), "max_distance": float(distance.max()),
            "n_grad": round(n_grad / max(1, len(y)), 2), "elapsed_s": round(time.perf_counter() - started, 3),
            "threat": threat.to_dict(), "params": _attack_params(attack),
            "correct": correct.int().tolist(),  # per sample, for the worst case across commands
        }
        last_adv = (name, x_adv_all, pred_adv_all)
    payload = {"threat": threat.to_dict(), "n_samples": int(len(y)), "dataset": dataset.name,
               "clean_accuracy": float((clean_pred == y).float().mean()), "labels": y.tolist(), "results": results}
    previous = read_json(run_dir / "attacks.json")
    if previous and previous.get("threat") == payload["threat"] and previous.get("labels") == payload["labels"]:
        payload["results"] = {**previous.get("results", {}), **results}
    name, x_adv_all, pred_adv_all = last_adv
    shown = torch.nonzero(clean_pred == y).squeeze(1)[:EXAMPLES_SHOWN]
    if len(shown) == 0:
        shown = torch.arange(min(EXAMPLES_SHOWN, len(y)))
    buffer = _npz_bytes(x=x[shown].numpy(), x_adv=x_adv_all[shown].numpy(), y=y[shown].numpy(),
                        pred=clean_pred[shown].numpy(), pred_adv=pred_adv_all[shown].numpy(),
                        index=shown.numpy(), classes=np.array(dataset.classes), attack=np.array(name))
    atomic_write_json(run_dir / "attacks.json", payload)
    atomic_write_bytes(run_dir / "examples.npz", buffer)
    return payload


def evaluate_into(run_dir: Path, model, dataset, threat, *, suite, samples: int | None, batch_size: int,
                  curve: list[float] | None, curve_suite, seed: int, device) -> dict:
    """gradguard.evaluation.evaluate (+ evaluate_curve) on the test split; write robustness.json (+ curve.json)."""
    from .evaluation import evaluate, evaluate_curve
    from .io import atomic_write_json

    x, y = test_split(dataset, samples)
    x, y = x.to(device), y.to(device)
    suite, note = runnable_suite(suite, threat)
    curve_suite, curve_note = runnable_suite(curve_suite, threat)
    report = evaluate(model, (x, y), threat, suite=suite, batch_size=batch_size, seed=seed,
                      progress=sys.stderr.isatty())
    robustness = _with_class_names(report.to_dict(), dataset.classes)
    if note:
        robustness["fallback"] = note
    atomic_write_json(run_dir / "robustness.json", robustness)
    curve_data = None
    if curve:
        curve_data = evaluate_curve(model, (x, y), threat, curve, suite=curve_suite, batch_size=batch_size,
                                    seed=seed, progress=sys.stderr.isatty()).to_dict()
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
        note = (f"suite {suite!r} needs attacks that are not installed ({_one_line(error)}); "
                "ran the 'classic' suite (FGSM, PGD-40) instead, which overestimates robustness")
        log(f"[gradguard] warning: {note}")
        return "classic", note
    return suite, None


def diagnose_into(run_dir: Path, model, dataset, threat, *, samples: int, curvature: bool, seed: int, device) -> dict:
    """Masking checklist (masking.json) + gradient findings from gradflow.jsonl + curvature (diagnosis.json)."""
    try:
        from .diagnostics import check_masking
    except ImportError:  # FALLBACK until the masking checklist lands: skipped, and said so
        check_masking = None
        log("[gradguard] warning: gradguard.diagnostics.check_masking is not available; masking checklist skipped")
    from .io import atomic_write_json, atomic_write_text
    from .report.rundir import read_json, read_jsonl

    x, y = test_split(dataset, samples)
    x, y = x.to(device), y.to(device)
    masking = check_masking(model, (x, y), threat, n_samples=samples, seed=seed) if check_masking else None
    diagnosis = dict(read_json(run_dir / "diagnosis.json") or {})
    records = read_jsonl(run_dir / "gradflow.jsonl")
    if records:
        from .diagnostics import findings_from_records

        diagnosis["gradient_findings"] = [f.to_dict() for f in findings_from_records(records)]
    if curvature:
        from .diagnostics.curvature import input_curvature, top_hessian_eigenvalue

        xb, yb = x[:64], y[:64]
        diagnosis["curvature"] = {"top_hessian_eigenvalue": float(top_hessian_eigenvalue(model, xb, yb)),
                                  "input_curvature_mean": float(input_curvature(model, xb, yb).mean()),
                                  "n_samples": int(len(yb))}
    if masking is not None:
        diagnosis["masking_verdict"] = masking.verdict
        atomic_write_text(run_dir / "masking.json", masking.to_json())
    atomic_write_json(run_dir / "diagnosis.json", diagnosis)
    return {"masking": json.loads(masking.to_json()) if masking is not None else {}, "diagnosis": diagnosis}


def predict(model, x, batch_size: int, device):
    import torch

    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


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
# Commands: each returns (result for --json, text for humans)
# ================================================================================================
def cmd_list(args) -> tuple[dict, str]:
    from .data import list_datasets
    from .models import list_models
    from .train import METHODS

    catalogue = {"attacks": available_attacks(), "methods": sorted(METHODS), "models": list_models(),
                 "datasets": list_datasets()}
    try:
        from .evaluation import SUITES

        catalogue["suites"] = sorted(SUITES)
    except ImportError:
        pass
    chosen = {args.what: catalogue[args.what]} if args.what else catalogue
    return chosen, "\n".join(f"{kind}: {', '.join(names)}" for kind, names in chosen.items())


def cmd_train(args) -> tuple[dict, str]:
    device = resolve_device(args.device)
    dataset = load_data(args.dataset, args.data_root)
    needs_threat = args.method != "standard" or args.eps is not None
    threat = make_threat_from(args.norm, args.eps) if needs_threat else None
    model_kwargs = _model_kwargs(args)
    out = Path(args.out)
    with staged_run_dir(out, replace=args.force, resumable=True, resume=args.resume) as staging:
        manifest = train_into(
            staging, dataset, model_name=args.model, model_kwargs=model_kwargs, method=args.method, threat=threat,
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            clip_grad_norm=args.clip_grad_norm, clip_grad_value=args.clip_grad_value, l2=args.l2,
            train_samples=args.train_samples, val_samples=args.samples,
            val_attack=None if args.val_attack == "none" or threat is None else args.val_attack,
            monitor_every=args.monitor_every if args.monitor else None, seed=args.seed, device=device,
            label=out.name, extra={"data_root": args.data_root}, method_kwargs=_key_values(args.method_arg, "method-arg"),
            schedule=args.schedule, eps_warmup_epochs=args.eps_warmup_epochs, resume=args.resume)
    history = manifest.pop("history")
    last = history[-1] if history else {}
    rows = [[r.get("epoch"), r.get("train_loss"), r.get("train_clean_acc"), r.get("val_clean_acc"),
             r.get("val_robust_acc")] for r in history]
    text = format_table(["epoch", "train loss", "train acc", "val clean", "val robust"], rows)
    result = {"run_dir": str(out), "final": last, "epochs": len(history), "manifest": manifest}
    return result, f"{text}\n\nmodel saved in {out}/ (model.safetensors, metrics.jsonl)"


def cmd_attack(args) -> tuple[dict, str]:
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    model = load_run_model(run_dir, device)
    check_writable(run_dir)
    dataset = run_dataset(run_dir, args.dataset, args.data_root)
    threat = run_threat(run_dir, args.norm, args.eps)
    names = parse_names(args.attack, "attack")
    payload = attack_into(run_dir, model, dataset, threat, names, samples=args.samples, batch_size=args.batch_size,
                          steps=args.steps, seed=args.seed, device=device)
    rows = [["clean", payload["clean_accuracy"], None, None]] + [
        [name, r["robust_accuracy"], r["mean_distance"], r["elapsed_s"]] for name, r in payload["results"].items()]
    text = format_table(["attack", "accuracy", "mean dist.", "time (s)"], rows)
    return payload, f"{threat.norm} eps={threat.eps:g}, {payload['n_samples']} test samples\n{text}\n\nwrote {run_dir}/attacks.json"


def cmd_evaluate(args) -> tuple[dict, str]:
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    model = load_run_model(run_dir, device)
    check_writable(run_dir)
    dataset = run_dataset(run_dir, args.dataset, args.data_root)
    threat = run_threat(run_dir, args.norm, args.eps)
    suite = _suite_arg(args.suite)
    curve = parse_eps_list(args.curve) if args.curve else None
    result = evaluate_into(run_dir, model, dataset, threat, suite=suite, samples=args.samples,
                           batch_size=args.batch_size, curve=curve, curve_suite=_suite_arg(args.curve_suite),
                           seed=args.seed, device=device)
    robustness = result["robustness"]
    rows = [["clean", robustness.get("clean_accuracy")]] + [[name, value] for name, value in
                                                            (robustness.get("per_attack") or {}).items()]
    rows.append(["worst case", robustness.get("robust_accuracy")])
    text = format_table(["attack", "accuracy"], rows)
    if result["curve"]:
        text += "\n\n" + format_table(["eps", "robust accuracy"], list(zip(result["curve"]["eps"],
                                                                          result["curve"]["robust_accuracy"])))
    header = f"{threat.norm} eps={threat.eps:g}, {robustness.get('n_samples')} test samples"
    return result, f"{header}\n{text}\n\nwrote {run_dir}/robustness.json"


def cmd_diagnose(args) -> tuple[dict, str]:
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    model = load_run_model(run_dir, device)
    check_writable(run_dir)
    dataset = run_dataset(run_dir, args.dataset, args.data_root)
    threat = run_threat(run_dir, args.norm, args.eps)
    result = diagnose_into(run_dir, model, dataset, threat, samples=args.samples, curvature=args.curvature,
                           seed=args.seed, device=device)
    rows = [[c.get("name"), c.get("status"), (c.get("advice") or "")[:70]] for c in result["masking"].get("checks", [])]
    text = format_table(["masking check", "status", "advice"], rows) + f"\nverdict: {result['masking'].get('verdict')}"
    findings = result["diagnosis"].get("gradient_findings")
    if findings is not None:
        text += "\n\n" + (format_table(["gradient finding", "layer"], [[f.get("kind"), f.get("layer")] for f in findings])
                          if findings else "gradient flow: no issue found")
    if "curvature" in result["diagnosis"]:
        text += f"\ntop Hessian eigenvalue: {result['diagnosis']['curvature']['top_hessian_eigenvalue']:.4g}"
    return result, f"{text}\n\nwrote {run_dir}/masking.json, {run_dir}/diagnosis.json"


def cmd_report(args) -> tuple[dict, str]:
    from .report import build_report
    from .report.rundir import read_json

    run_dir = Path(args.run_dir)
    if run_dir.is_dir():
        check_writable(run_dir)
    path = build_report(run_dir)
    summary = read_json(run_dir / "summary.json")
    return {"report": str(path), "summary": summary}, headline_text(summary) + f"\n\nreport: {path}"


def headline_text(summary: dict) -> str:
    from .report.builder import headline_columns

    attacks = headline_columns(summary)
    rows = [[m["label"], m["clean_accuracy"], *[m["attacks"].get(a) for a in attacks], m["robust_accuracy"],
             m["masking_verdict"]] for m in summary["models"]]
    table = format_table(["model", "clean", *attacks, "worst case", "masking"], rows) if rows else "no models"
    for g in summary.get("gradients", []):
        table += f"\ngradient flow {g['label']}: {', '.join(g['kinds']) or 'no issue found'}"
    return table


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
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


def cmd_demo(args) -> tuple[dict, str]:
    from .report import build_report
    from .report.rundir import read_json

    device = resolve_device(args.device)
    settings = dict(DEMO_SETTINGS[bool(args.quick)])
    if args.dataset != "digits" and not args.quick:
        settings.update(DEMO_FMNIST)
    if args.epochs is not None:
        settings.update(epochs=args.epochs, at_epochs=args.epochs)
    if args.suite is not None:
        settings.update(suite=_suite_arg(args.suite))
    dataset = load_data(args.dataset, args.data_root)
    threat = make_threat_from(args.norm, args.eps)
    out = Path(args.out)
    replace = args.force or (read_manifest(out).get("command") == "demo" if out.is_dir() else False)
    started = time.perf_counter()
    model_name = "mlp" if dataset.input_shape[-1] <= 16 else "fmnist-cnn"
    with staged_run_dir(out, replace=replace) as staging:
        write_manifest(staging, kind="suite", command="demo", quick=bool(args.quick), dataset=dataset.name,
                       classes=dataset.classes, threat=threat.to_dict(), seed=args.seed, settings=settings)
        for order, (label, method, epochs) in enumerate((("standard", "standard", settings["epochs"]),
                                                        ("adversarial", "pgd", settings["at_epochs"]))):
            model_dir = staging / "models" / label
            with timed(f"[demo] training the {label} model ({method}, {epochs} epochs)"):
                train_into(model_dir, dataset, model_name=model_name, model_kwargs={}, method=method, threat=threat,
                           epochs=epochs, batch_size=settings["batch_size"], optimizer="adam", lr=None,
                           clip_grad_norm=None, clip_grad_value=None, l2=0.0, train_samples=settings["train_samples"],
                           val_samples=settings["samples"] or 200, val_attack="pgd", monitor_every=None,
                           seed=args.seed, device=device, label=label, order=order)
            model = load_run_model(model_dir, device)
            with timed(f"[demo] attacking the {label} model with FGSM, BIM, PGD"):
                attack_into(model_dir, model, dataset, threat, ["fgsm", "bim", "pgd"], samples=settings["samples"],
                            batch_size=256, steps=None, seed=args.seed, device=device)
            with timed(f"[demo] evaluating the {label} model: {_suite_name(settings['suite'])} suite, eps curve"):
                evaluate_into(model_dir, model, dataset, threat, suite=settings["suite"], samples=settings["samples"],
                              batch_size=256, curve=settings["curve"], curve_suite="quick", seed=args.seed,
                              device=device)
            with timed(f"[demo] gradient-masking checklist on the {label} model"):
                diagnose_into(model_dir, model, dataset, threat, samples=settings["masking_samples"],
                              curvature=False, seed=args.seed, device=device)
        for order, (label, activation, init) in enumerate((("sigmoid-mlp", "sigmoid", "normal"),
                                                          ("relu-mlp", "relu", "he"))):
            with timed(f"[demo] gradient monitor on a {settings['grad_depth']}-layer {activation} MLP ({init} init)"):
                train_into(staging / "gradflow" / label, dataset, model_name="mlp",
                           model_kwargs={"depth": settings["grad_depth"], "width": 64, "activation": activation,
                                         "init": init},
                           method="standard", threat=None, epochs=settings["grad_epochs"], batch_size=32,
                           optimizer="sgd", lr=0.05, clip_grad_norm=None, clip_grad_value=None, l2=0.0,
                           train_samples=settings["train_samples"], val_samples=settings["samples"] or 500,
                           val_attack=None, monitor_every=5, seed=args.seed, device=device, label=label,
                           order=order, extra={"activation": activation, "init": init})
        with timed("[demo] writing the report"):
            build_report(staging, display_path=out)
    report_path = out / "report.html"
    summary = read_json(out / "summary.json")
    seconds = time.perf_counter() - started
    text = headline_text(summary) + f"\n\ndemo finished in {seconds:.0f} s\nreport: {report_path}"
    return {"report": str(report_path), "seconds": round(seconds, 1), "summary": summary}, text


def _suite_name(suite) -> str:
    if isinstance(suite, str):
        return repr(suite)
    return "[" + ", ".join(s.get("label", s.get("name")) if isinstance(s, dict) else str(s) for s in suite) + "]"


def _suite_arg(value):
    if isinstance(value, (list, tuple)):
        return list(value)
    from .evaluation import SUITES

    value = str(value)
    if value in SUITES:
        return value
    return parse_names(value, "suite")


def _model_kwargs(args) -> dict:
    kwargs = {}
    for key in ("depth", "width", "activation", "init"):
        value = getattr(args, key, None)
        if value is not None:
            kwargs[key] = value
    kwargs.update(_key_values(args.model_arg, "model-arg"))
    return kwargs


def _key_values(items: Sequence[str] | None, argument: str) -> dict:
    """KEY=VALUE strings -> dict; values are parsed as JSON when they can be (numbers, true/false, lists)."""
    result = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"{argument}: expected KEY=VALUE, got {item!r}")
        try:
            result[key] = json.loads(value)
        except ValueError:
            result[key] = value
    return result


# ================================================================================================
# The parser
# ================================================================================================
def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--seed", type=int, default=0, help="fixes data order, random starts and restarts (default 0)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    group.add_argument("--config", metavar="FILE", help="read options from a .toml/.json (or .yaml with PyYAML) file; "
                       "flags on the command line win")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    return common


def _threat_options(parser: argparse.ArgumentParser, eps_help: str) -> None:
    group = parser.add_argument_group("threat model")
    group.add_argument("--norm", choices=["linf", "l2", "l1"], default=None, help="perturbation norm (default linf)")
    group.add_argument("--eps", type=non_negative_float, default=None, help=eps_help)


def _data_options(parser: argparse.ArgumentParser, *, dataset_default: str | None, samples_default: int | None,
                  samples_help: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=dataset_default,
                       help="digits | fashion-mnist | npz:PATH | folder:PATH" + (
                           f" (default {dataset_default})" if dataset_default else " (default: the run's dataset)"))
    group.add_argument("--data-root", help="folder with the Fashion-MNIST IDX files (else $GRADGUARD_DATA, then "
                                           "/usr/share/datasets/fashion-mnist)")
    group.add_argument("--samples", type=positive_int, default=samples_default, help=samples_help)


def add_command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose description and examples keep their line breaks."""
    return commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> OneLineParser:
    common = _common_options()
    parser = OneLineParser(prog="gradguard", description="Attack, harden and diagnose PyTorch models through their "
                           "gradients. Every command works on a run directory; see docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = add_command(commands, "demo", parents=[common], help="the end-to-end tour: train, attack, evaluate, diagnose, "
                               "report", description="Train a standard and a PGD-trained model, attack both with FGSM, "
                               "BIM and PGD, run the evaluation suite and the masking checklist, compare gradient flow "
                               "in a deep sigmoid vs ReLU MLP, and write OUT/report.html.")
    demo.epilog = ("examples:\n  gradguard demo                      # digits, about two minutes on 2 CPU cores\n"
                   "  gradguard demo --quick --out /tmp/d  # seconds: a smoke test\n"
                   "  gradguard demo --dataset fashion-mnist --out runs/demo-fmnist")
    demo.add_argument("--out", default="runs/demo", help="run directory to create (default runs/demo; an earlier demo "
                      "there is replaced)")
    demo.add_argument("--quick", action="store_true", help="tiny settings (seconds): for tests and smoke checks")
    demo.add_argument("--epochs", type=positive_int, help="override the training epochs of both models")
    demo.add_argument("--force", action="store_true", help="replace OUT even if it is not a demo run")
    demo.add_argument("--suite", help="evaluation suite: quick | fast | standard | classic | attack names (default standard; "
                      "quick with --quick)")
    _data_options(demo, dataset_default="digits", samples_default=None, samples_help="unused by demo")
    _threat_options(demo, "perturbation budget (default 0.1 for linf)")
    demo.set_defaults(handler=cmd_demo)

    train = add_command(commands, "train", parents=[common], help="train a model (standard or adversarial) into a new run "
                                "directory", description="Train a zoo model with gradguard.train.Trainer and save "
                                "config.json, metrics.jsonl, model.safetensors + model.json and checkpoints to --out.")
    train.epilog = ("examples:\n  gradguard train --out runs/std --epochs 20\n"
                    "  gradguard train --out runs/pgd --method pgd --eps 0.1 --clip-grad-norm 1.0 --l2 5e-4\n"
                    "  gradguard train --out runs/sig --depth 8 --activation sigmoid --init normal --monitor")
    train.add_argument("--out", required=True, help="run directory to create (must not exist unless --force)")
    train.add_argument("--force", action="store_true", help="replace --out if it exists")
    train.add_argument("--model", default="mlp", help="zoo model: see `gradguard list models` (default mlp)")
    train.add_argument("--depth", type=positive_int, help="mlp: hidden layers")
    train.add_argument("--width", type=positive_int, help="mlp: hidden units per layer")
    train.add_argument("--activation", help="mlp: relu, sigmoid, tanh, gelu, leaky_relu, elu")
    train.add_argument("--init", help="mlp: default, he, xavier, normal (N(0, 0.01²)), large (N(0, 1))")
    train.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="any other model keyword (repeatable)")
    train.add_argument("--method", default="standard", help="standard | fgsm | fgsm-rs | pgd | trades (default standard)")
    train.add_argument("--method-arg", action="append", metavar="KEY=VALUE",
                       help="method option, e.g. beta=6.0 for trades or steps=10 for pgd (repeatable)")
    train.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default 10)")
    train.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    train.add_argument("--optimizer", choices=["sgd", "adam"], default="adam", help="optimiser (default adam)")
    train.add_argument("--schedule", choices=["constant", "cyclic", "piecewise"], default="constant",
                       help="learning-rate schedule (default constant)")
    train.add_argument("--eps-warmup-epochs", type=non_negative_float, default=0.0,
                       help="ramp eps linearly from 0 over this many epochs (default 0)")
    train.add_argument("--lr", type=non_negative_float, help="learning rate (default 1e-3 adam, 0.1 sgd)")
    train.add_argument("--clip-grad-norm", type=non_negative_float, help="clip the global gradient norm to this value")
    train.add_argument("--clip-grad-value", type=non_negative_float, help="clip each gradient element to ±value")
    train.add_argument("--l2", type=non_negative_float, default=0.0, help="explicit L2 penalty r·‖θ‖² (default 0)")
    train.add_argument("--train-samples", type=positive_int, help="use only the first N training samples")
    train.add_argument("--val-attack", choices=["pgd", "fgsm", "none"], default="pgd",
                       help="per-epoch validation attack when a threat is set (default pgd: PGD-10)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run of --out from its last finished epoch (same settings)")
    train.add_argument("--monitor", action="store_true", help="record gradient flow (gradflow.jsonl) with GradientMonitor")
    train.add_argument("--monitor-every", type=positive_int, default=10, help="monitor every N steps (default 10)")
    _data_options(train, dataset_default="digits", samples_default=500,
                  samples_help="validation samples per epoch (default 500)")
    _threat_options(train, "training / validation budget (default 0.1 for linf; needed by adversarial methods)")
    train.set_defaults(handler=cmd_train)

    attack = add_command(commands, "attack", parents=[common], help="attack a trained model (FGSM, BIM, PGD, ...)",
                                 description="Run single attacks on the run's test split; write attacks.json and "
                                 "examples.npz (images for the report) into RUN_DIR.")
    attack.epilog = ("examples:\n  gradguard attack runs/pgd\n"
                     "  gradguard attack runs/pgd --attack pgd --steps 100 --eps 0.2 --samples 500 --json")
    attack.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with model.safetensors")
    attack.add_argument("--attack", default="fgsm,bim,pgd", help="comma-separated names, see `gradguard list attacks` "
                        "(default fgsm,bim,pgd)")
    attack.add_argument("--steps", type=positive_int, help="iterations for iterative attacks (default: each attack's)")
    attack.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default 256)")
    _data_options(attack, dataset_default=None, samples_default=1000, samples_help="test samples (default 1000)")
    _threat_options(attack, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    attack.set_defaults(handler=cmd_attack)

    evaluate = add_command(commands, "evaluate", parents=[common], help="robust accuracy with an attack suite",
                                   description="Clean, per-attack and worst-case robust accuracy with an attack suite "
                                   "(gradguard.evaluation.evaluate); optionally an accuracy-vs-eps curve. Writes "
                                   "robustness.json (and curve.json) into RUN_DIR.")
    evaluate.epilog = ("examples:\n  gradguard evaluate runs/pgd\n"
                       "  gradguard evaluate runs/pgd --suite quick --curve 0,0.05,0.1,0.2 --samples 500")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with model.safetensors")
    evaluate.add_argument("--suite", default="standard", help="quick | fast | standard | classic | comma-separated attack names "
                          "(default standard)")
    evaluate.add_argument("--curve", help="comma-separated eps values for an accuracy-vs-eps curve, e.g. 0,0.05,0.1")
    evaluate.add_argument("--curve-suite", default="quick", help="suite for the curve (default quick)")
    evaluate.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default 256)")
    _data_options(evaluate, dataset_default=None, samples_default=1000, samples_help="test samples (default 1000)")
    _threat_options(evaluate, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    evaluate.set_defaults(handler=cmd_evaluate)

    diagnose = add_command(commands, "diagnose", parents=[common], help="gradient-masking checklist and gradient health",
                                   description="Run the gradient-masking checklist (masking.json), read gradient "
                                   "findings from gradflow.jsonl (recorded by `train --monitor`) and optionally the "
                                   "curvature; writes diagnosis.json into RUN_DIR.")
    diagnose.epilog = "examples:\n  gradguard diagnose runs/pgd\n  gradguard diagnose runs/sig --curvature --json"
    diagnose.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with model.safetensors")
    diagnose.add_argument("--curvature", action="store_true", help="also estimate the top Hessian eigenvalue")
    _data_options(diagnose, dataset_default=None, samples_default=200, samples_help="test samples (default 200)")
    _threat_options(diagnose, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    diagnose.set_defaults(handler=cmd_diagnose)

    report = add_command(commands, "report", parents=[common], help="(re)build report.html from a run directory",
                                 description="Rebuild RUN_DIR/report.html (self-contained), report.md, summary.json "
                                 "and plots/ from the files in RUN_DIR.")
    report.epilog = "examples:\n  gradguard report runs/demo\n  gradguard report runs/pgd --json"
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (a model run or a demo run)")
    report.set_defaults(handler=cmd_report)

    listing = add_command(commands, "list", parents=[common], help="list attacks, methods, models and datasets")
    listing.add_argument("what", nargs="?", choices=["attacks", "methods", "models", "datasets", "suites"],
                         help="one catalogue (default: all)")
    listing.set_defaults(handler=cmd_list)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse twice when --config is given: the file's options become defaults, explicit flags still win."""
    from .config import options_for, read_config_file

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.config:
        return args
    options = options_for(args.command, read_config_file(args.config))
    subparser = _subparser(parser, args.command)
    known = {action.dest for action in subparser._actions}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"config: unknown option(s) {unknown} for `gradguard {args.command}`; see "
                          f"`gradguard {args.command} --help`")
    options.pop("config", None)
    subparser.set_defaults(**{key: _config_value(subparser, key, value) for key, value in options.items()})
    return parser.parse_args(argv)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise ConfigError(f"config: unknown command {command!r}")


def _config_value(subparser: argparse.ArgumentParser, key: str, value: Any) -> Any:
    """Run a config value through the option's own type check, so a file gets the same validation as a flag."""
    action = next(a for a in subparser._actions if a.dest == key)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if action.type is not None and value is not None and not isinstance(value, bool):
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ConfigError(f"config: {key}: {error}") from None
    if action.choices is not None and value is not None and value not in action.choices:
        raise ConfigError(f"config: {key}: expected one of {list(action.choices)}, got {value!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command (returns the exit status)."""
    try:
        args = parse_args(argv)
        import torch

        torch.manual_seed(args.seed)
        result, text = args.handler(args)
    except GradguardError as error:
        print(f"gradguard: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeptPartialRun as interrupted:
        print(f"gradguard: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("gradguard: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except OSError as error:  # disk full, permission denied while writing, ...
        print(f"gradguard: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2, default=_json_default))
    else:
        print(text)
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
