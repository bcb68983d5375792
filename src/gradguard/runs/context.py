"""What a command works on: its device (and the record of how it ran), its data (both splits in memory for
training, a streamed split for evaluation, with the console lines that say which samples and classes), its threat,
its model (a run directory's, or any model source) and its attacks by name.

``gradguard.workflow`` re-exports everything here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import CheckpointError, ConfigError
from ..layout import MODEL_WEIGHTS_FILE, MODELS_DIR
from .console import NOTES, log, say
from .staging import read_manifest, write_manifest

DEFAULT_EPS = {"linf": 0.1, "l2": 1.0, "l1": 5.0}


def resolve_device(name: str | None) -> Any:
    """``auto`` (or None) picks CUDA when available; else cpu, cuda or cuda:N (``attacks.base.resolve_device``).
    Under torchrun a CUDA device is this process's own GPU, ``cuda:LOCAL_RANK``."""
    from ..attacks.base import resolve_device as resolve
    from ..runtime.distributed import local_device

    return local_device(resolve(name))


def device_record(device, *, amp: str | None = None, channels_last: bool = False) -> dict:
    """How a command ran, for its results: device, autocast precision, memory layout, process count and the CPU
    threads torch used (``--threads``)."""
    import torch

    from ..runtime.distributed import world_size

    return {"device": str(device), "amp": amp, "channels_last": bool(channels_last), "world_size": world_size(),
            "threads": torch.get_num_threads()}


def load_data(name: str, root: str | None = None, *, resize: Any = None, center_crop: Any = None,
              classes: Any = None):
    """Both splits of a dataset in memory (``gradguard.data.load_dataset``): for training. A source without a
    train/test split of its own keeps its seeded split (train on one part, validate on the other), and the console
    says so, with the counts and the class mapping."""
    from ..data import load_dataset

    NOTES.clear()
    dataset = load_dataset(name, root=root, resize=resize, center_crop=center_crop, classes=classes)
    train, test = dataset.split_info.get("train") or {}, dataset.split_info.get("test") or {}
    if train.get("how") == "seeded":
        say(f"data: training on {train['text']}; validating on the other {test['n']}")
    elif train:
        say(f"data: training on {train['text']}; validating on {test['text']}")
    say_classes(dataset.classes, dataset.class_source)
    return dataset


def open_test_split(name: str, root: str | None = None, *, resize: Any = None, center_crop: Any = None,
                    split: str | None = None, classes: Any = None, note: str = ""):
    """The samples a command evaluates, as a streamed ``SampleSet`` (``gradguard.data.open_split``): read batch by
    batch, never whole. ``split`` None is the source's own test split, or all of a source without one (which the
    console says, with the counts); "test" of such a source is a seeded 25 %, "train" the other 75 %."""
    from ..data import has_own_split, open_split

    if split is None:
        split = "test" if has_own_split(name) else "all"
    NOTES.clear()
    samples = open_split(name, split, root, resize=resize, center_crop=center_crop, classes=classes)
    info = samples.split_info
    hints = {"all": "; --split test would take a seeded 25 % of them", "seeded": note}
    hint = hints.get(str(info.get("how")), "")
    say(f"data: evaluating {info.get('text') or f'{len(samples)} samples of {name}'}{hint}")
    say_classes(samples.classes, samples.class_source)
    return samples


def samples_label(samples, n: int | None) -> str:
    """The samples a command's header counts: "1000 samples (all of the data)", "250 test samples (of the 250 in a
    seeded split of 1000)", "10000 test samples"."""
    info = getattr(samples, "split_info", None) or {}
    if info.get("split") == "all":
        return f"{n} samples (" + ("all of the data" if n == info.get("n") else
                                   f"the first {n} of all {info.get('n')}, in a seeded order") + ")"
    kind = "training samples" if info.get("split") == "train" else "test samples"
    if info.get("how") == "seeded":
        return f"{n} {kind} (of the {info.get('n')} in a seeded split of {info.get('of')})"
    return f"{n} {kind}"


def say_classes(classes: Sequence[str], source: str) -> None:
    from ..data import mapping_text

    say(f"classes (label name): {mapping_text(classes)}" + (f" — from {source}" if source else ""))


def absolute_source(name: str | None) -> str | None:
    """A data source with its path made absolute (``npy:data`` -> ``npy:/home/me/data``), so that a run directory
    works from any directory; built-in names as they are."""
    if not isinstance(name, str):
        return name
    for prefix in ("npz:", "npy:", "folder:"):
        if name.startswith(prefix):
            return prefix + os.path.abspath(os.path.expanduser(name[len(prefix):]))
    return name


def absolute_path(path: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def data_record(samples, given: str, data_root: str | None = None) -> dict:
    """run.json's data fields: the source (absolute) and as given, the root, which samples and why, the classes
    in label order and where that order came from."""
    record: dict[str, Any] = {"dataset": absolute_source(given), "dataset_given": given,
                              "data_root": absolute_path(data_root)}
    if data_root and absolute_path(data_root) != data_root:
        record["data_root_given"] = data_root
    record.update(split=getattr(samples, "split_info", None) or None, classes=list(samples.classes),
                  class_source=getattr(samples, "class_source", "") or None)
    return record


def chance_note(accuracy: float | None, n: int, samples) -> str | None:
    """The chance-level warning (``gradguard.data.chance_warning``) for clean accuracy on ``samples``, logged."""
    from ..data import chance_warning

    note = chance_warning(accuracy, len(samples.classes), n, samples.name, getattr(samples, "class_source", ""))
    if note:
        say(f"warning: {note}")
    return note


def test_samples(dataset):
    """The test split as a ``SampleSet``: an opened split as it is, an in-memory ``Dataset``'s test tensors wrapped."""
    from ..data import SampleSet, TensorSampleSet

    if isinstance(dataset, SampleSet):
        return dataset
    samples = TensorSampleSet(dataset.name, dataset.classes, dataset.x_test, dataset.y_test)
    samples.split_info = dict((getattr(dataset, "split_info", None) or {}).get("test") or {})
    samples.class_source = getattr(dataset, "class_source", "")
    return samples


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
    from ..threat import make_threat

    norm = (norm or "linf").lower()
    return make_threat(norm, DEFAULT_EPS.get(norm, 0.1) if eps is None else eps)


def run_threat(run_dir: Path, norm: str | None, eps: float | None):
    """The threat given on the command line, else the one the run was trained against, else the default."""
    from ..threat import threat_from_dict

    stored = read_manifest(run_dir).get("threat")
    if norm is None and eps is None and isinstance(stored, dict):
        return threat_from_dict(stored)
    if norm is None:
        norm = stored.get("norm", "linf") if isinstance(stored, dict) else "linf"
    return make_threat_from(norm, eps)


def load_run_model(run_dir: Path, device):
    """The model saved in ``run_dir`` (model.safetensors + model.json), in eval mode on ``device``."""
    from ..models import load

    if not run_dir.exists():
        raise CheckpointError(f"run_dir: no run directory at {str(run_dir)!r}; train one with `gradguard train --out "
                              f"{run_dir}` first")
    if not (run_dir / MODEL_WEIGHTS_FILE).exists() and (run_dir / MODELS_DIR).is_dir():
        choices = sorted(str(p) for p in (run_dir / MODELS_DIR).iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(f"run_dir: {str(run_dir)!r} is a suite run holding several models; pass one of {choices}")
    return load(run_dir, map_location=device).eval()


def run_dataset(run_dir: Path, dataset: str | None, data_root: str | None, *, resize: Any = None,
                center_crop: Any = None, split: str | None = None, classes: Any = None):
    """The samples to evaluate (streamed) of the dataset named on the command line, else the run's own (run.json,
    with its data root, resize, crop, split and a class list given when the run was made), else digits.

    A model gradguard trained on a source without a split of its own is evaluated on the held-out part
    (``split`` "test") unless told otherwise; a run made by another command keeps the split it was made with."""
    manifest = read_manifest(run_dir)
    recorded = manifest.get("dataset")
    own = dataset is None or (recorded is not None and absolute_source(dataset) == absolute_source(recorded))
    note = ""
    if own:
        if dataset is None:
            resize = resize if resize is not None else manifest.get("resize")
            center_crop = center_crop if center_crop is not None else manifest.get("center_crop")
        stored = manifest.get("split")
        stored = stored if isinstance(stored, dict) else {}
        if split is None and manifest.get("command") == "train":
            split = "test"
            note = "; the model was trained on the other part"
        elif split is None and stored.get("split") in ("all", "test", "train"):
            split = stored["split"]
        elif split is None and manifest and "split" not in manifest:  # a run made before splits were recorded
            split = "test"
            note = "; the split this run directory was made with (it predates split records)"
        from ..data.labels import GIVEN

        if classes is None and manifest.get("class_source") == GIVEN:
            classes = manifest.get("classes")
    return open_test_split(dataset or recorded or "digits", data_root or manifest.get("data_root"),
                           resize=resize, center_crop=center_crop, split=split, classes=classes, note=note)


def resolve_model(spec: str, *, weights: str | None = None, kwargs: dict | None = None,
                  mean: str | float | Sequence[float] | None = None, std: str | float | Sequence[float] | None = None,
                  device: Any = "cpu", logits: str | int | None = None):
    """Any model gradguard.models.resolve accepts (``package.module:callable`` + weights, ``torchvision:NAME``,
    a run directory, a .safetensors file), in eval mode on ``device``; ``logits`` selects the logits in an output
    that is not a tensor (``--logits KEY|INDEX``)."""
    from ..models import resolve

    return resolve(spec, weights, mean=mean, std=std, map_location=device, logits=logits, **(kwargs or {})).eval()


def check_first_pass(model, dataset, device, *, logits: str | int | None = None, split: str = "test"):
    """``gradguard.models.first_pass`` on the first two samples of ``dataset`` (an opened split, or the ``split``
    of an in-memory ``Dataset``), before any work: channels of data, mean/std and first layer agree, the model
    runs, and its logits are found. Returns the ``FirstPass`` (its ``model`` is the one to use)."""
    import numpy as np

    from ..models import first_pass

    if hasattr(dataset, "x_train"):
        x = (dataset.x_train if split == "train" else dataset.x_test)[:2]
    else:
        x = dataset.get_batch(np.arange(min(2, len(dataset))))[0]
    found = first_pass(model, x.to(device), logits)
    if found.output != "tensor":
        log(f"[gradguard] model output: {found.output} (the logits of the model's output)")
    return found


def start_model_run(run_dir: Path, model, *, dataset, dataset_name: str, data_root: str | None, threat, seed: int,
                    command: str, label: str, resize: Any = None, center_crop: Any = None,
                    model_output: str | None = None) -> dict:
    """Make ``run_dir`` a model run for a model that gradguard did not train: its weights and the source it was
    resolved from (model.safetensors + model.json, so ``load_run_model`` rebuilds it) and run.json, which also
    records the data (name, root, resize, crop) so later commands on the run directory reopen the same split."""
    from ..models import describe_source, model_source, save

    source = model_source(model)
    save(model, run_dir, dataset=absolute_source(dataset_name))
    return write_manifest(
        run_dir, kind="model", command=command, label=label, **data_record(dataset, dataset_name, data_root),
        resize=resize, center_crop=center_crop, input_shape=list(dataset.input_shape),
        threat=threat.to_dict(), seed=seed, model_source=source, model_source_text=describe_source(source),
        model_output=model_output)


def available_attacks() -> list[str]:
    """The attack names of the one registry (``gradguard.evaluation.ATTACKS``) whose class this build has."""
    from ..evaluation.suites import ATTACKS

    return [name for name, entry in ATTACKS.items() if entry.available()]


def make_attack(name: str, model, threat, *, seed: int, steps: int | None = None, amp: str | None = None,
                channels_last: bool = False, compile: bool = False):
    """An attack by its name in ``gradguard.evaluation.ATTACKS`` with its defaults, ``seed``, optionally ``steps``,
    and the precision (``amp``), memory layout (``channels_last``) and compilation (``compile``) of its passes."""
    from ..evaluation.suites import ATTACKS

    if name not in ATTACKS or not ATTACKS[name].available():
        raise ConfigError(f"attack: unknown attack {name!r}; choose from {available_attacks()}")
    if name == "transfer":
        raise ConfigError("attack: 'transfer' needs a surrogate model; evaluate with it instead, e.g. in a --config "
                          "file: [evaluate] suite = [{name = \"transfer\", surrogate = \"RUN_DIR\"}]")
    kwargs = dict(ATTACKS[name].fixed, seed=seed)
    if amp is not None:
        kwargs["amp"] = amp
    if channels_last:
        kwargs["channels_last"] = True
    if compile:
        kwargs["compile"] = True
    if steps is not None and name != "fgsm":
        kwargs["steps"] = steps
    return ATTACKS[name].attack_class()(model, threat, **kwargs)
