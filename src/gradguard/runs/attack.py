"""``attack_into``: single attacks by name on a run's test samples, batch by batch (under torchrun each rank takes
its share of the batches and rank 0 gathers and writes), into attacks.json (results per threat, merged with the
earlier ones) and examples.npz (the few images the report shows).

``gradguard.workflow`` re-exports the public names; ``gradguard attack`` and the demo call ``attack_into``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..layout import ATTACKS_FILE, EXAMPLES_FILE, ROBUSTNESS_FILE
from .console import progress
from .context import chance_note, device_record, make_attack, test_samples

EXAMPLES_SHOWN = 8


def attack_into(run_dir: Path, model, dataset, threat, names: Sequence[str], *, samples: int | None, batch_size: int,
                steps: int | None, seed: int, device, amp: str | None = None, channels_last: bool = False,
                compile: bool = False) -> dict:
    """Run single attacks on the test split, batch by batch; add their results to attacks.json; examples.npz.

    Only per-sample numbers (correct, distance) and the few images the report shows are kept, never the whole
    adversarial set. attacks.json keeps results per threat: earlier results at another norm or eps move to its
    ``other_threats`` list instead of being dropped. Returns what it wrote to attacks.json.

    Under torchrun batch ``b`` is attacked by rank ``b % world_size`` (each attack seeds every batch alike, so
    the spread changes nothing), the per-sample results are gathered in batch order and rank 0 alone writes.
    """
    from ..attacks.base import prepare_model
    from ..io import atomic_write_bytes, atomic_write_json
    from ..models import as_logits_model
    from ..report.rundir import read_json, sample_set
    from ..runtime import distributed

    model = as_logits_model(prepare_model(model, device, channels_last=channels_last))
    attacks = [(name, make_attack(name, model, threat, seed=seed, steps=steps, amp=amp, channels_last=channels_last,
                            compile=compile))
               for name in names]  # validate first
    data = test_samples(dataset)
    mine = _attack_own_batches(model, attacks, data, samples, batch_size, threat, device)
    blocks = sorted(distributed.gather_objects(mine["blocks"]), key=lambda block: block["index"])
    labels, clean_pred = _joined(blocks, "labels"), _joined(blocks, "clean_pred")
    clean_correct = clean_pred == labels
    results = {name: _attack_result(attack, name, blocks, clean_correct, threat, mine["elapsed"][name])
               for name, attack in attacks}
    for result in results.values():
        result.update(device_record(device, amp=amp, channels_last=channels_last))
    examples = ExamplePicker.merged(distributed.gather_objects([mine["examples"]]))
    group = {"threat": threat.to_dict(), "n_samples": int(len(labels)), "sample_set": sample_set(len(labels)),
             "clean_accuracy": int(clean_correct.sum()) / max(1, len(labels)), "labels": labels.tolist(),
             "results": results}
    group.update(split=getattr(data, "split_info", None) or None, classes=list(data.classes),
                 class_source=getattr(data, "class_source", "") or None,
                 warnings=[note for note in [chance_note(group["clean_accuracy"], len(labels), data)] if note])

    def write() -> dict:
        payload = merge_attack_results(read_json(run_dir / ATTACKS_FILE), group, dataset.name)
        buffer = examples.npz_bytes(clean_pred, data.classes)
        atomic_write_json(run_dir / ATTACKS_FILE, payload)
        atomic_write_bytes(run_dir / EXAMPLES_FILE, buffer)
        return payload

    return distributed.rank0_first(write)


ATTACK_SAMPLES = 1000  # test samples `attack` takes on a run that records none


def run_samples(run_dir: Path) -> int | None:
    """How many test samples the run's headline is measured on: the evaluation's (robustness.json), else the latest
    single attacks' (attacks.json); None when the run records neither. `attack` takes these by default, so that its
    results land in the same headline as the evaluation's instead of beside it on other samples."""
    from ..report.rundir import attack_groups, read_json, result_samples

    for result in (read_json(run_dir / ROBUSTNESS_FILE), *attack_groups(read_json(run_dir / ATTACKS_FILE))[:1]):
        recorded, _, count = result_samples(result)
        if isinstance(recorded, dict) and recorded.get("start", 0) == 0 and isinstance(recorded.get("count"), int):
            return recorded["count"]
        if isinstance(count, int) and count > 0:
            return count
    return None


def _attack_own_batches(model, attacks, data, samples: int | None, batch_size: int, threat, device) -> dict:
    """Clean predictions and every attack on this rank's batches (all of them in one process): per batch its
    index and per-sample results; per attack the seconds spent; the last attack's candidate example images."""
    import numpy as np
    import torch

    from ..evaluation.distributed import resolve_shard

    shard = resolve_shard(None)  # batch b on rank b % world_size, as evaluate shards its blocks
    count = len(data) if samples is None else min(samples, len(data))
    starts = [start for start in range(0, count, batch_size) if shard.owns(start // batch_size)]
    blocks, elapsed = [], {name: 0.0 for name, _ in attacks}
    examples = ExamplePicker(attacks[-1][0])
    for start in progress(starts, desc="attack") if shard.rank == 0 else starts:
        xb, yb = data.get_batch(np.arange(start, min(start + batch_size, count)))
        xb, yb = xb.cpu(), yb.cpu()
        with torch.no_grad():
            clean_pred = model(xb.to(device)).argmax(1).cpu()
        block = {"index": start // batch_size, "labels": yb, "clean_pred": clean_pred, "attacks": {}}
        for name, attack in attacks:
            started = time.perf_counter()
            result = attack.run(xb.to(device), yb.to(device))
            x_adv, pred_adv = result.x_adv.detach().cpu(), result.predictions.cpu()
            block["attacks"][name] = {"correct": pred_adv == yb, "distance": threat.distance(x_adv, xb),
                                      "n_grad": int(result.n_grad)}
            elapsed[name] += time.perf_counter() - started
            if name == examples.attack:
                examples.offer(start, xb, x_adv, yb, pred_adv, clean_pred == yb)
        blocks.append(block)
    return {"blocks": blocks, "elapsed": elapsed, "examples": examples}


def _joined(blocks: list[dict], key: str):
    import torch

    return torch.cat([block[key] for block in blocks])


def _attack_result(attack, name: str, blocks: list[dict], clean_correct, threat, elapsed: float) -> dict:
    """One attack's numbers over all batches (gathered from every rank, in batch order)."""
    import torch

    from ..runtime import distributed

    correct = torch.cat([block["attacks"][name]["correct"] for block in blocks])
    distance = torch.cat([block["attacks"][name]["distance"] for block in blocks])
    n_grad = sum(block["attacks"][name]["n_grad"] for block in blocks)
    return {
        "robust_accuracy": int(correct.sum()) / max(1, len(correct)),  # an exact count / n, as evaluate's
        "success_rate": float((~correct & clean_correct).sum() / max(1, int(clean_correct.sum()))),
        "mean_distance": float(distance.mean()), "max_distance": float(distance.max()),
        "n_grad": round(n_grad / max(1, len(correct)), 2),
        "elapsed_s": round(distributed.max_float(elapsed), 3),  # the slowest rank's time
        "threat": threat.to_dict(), "params": _attack_params(attack),
        "correct": correct.int().tolist(),  # per sample, for the worst case across commands
    }


class ExamplePicker:
    """Keeps the first few correctly classified images (else the first few) of an attack for the report's grid."""

    def __init__(self, attack: str) -> None:
        self.attack = attack
        self.kept: list[tuple[int, Any, Any, Any, Any]] = []  # (index, x, x_adv, y, pred_adv), clean-correct ones
        self.first: list[tuple[int, Any, Any, Any, Any]] = []

    def offer(self, offset: int, x, x_adv, y, pred_adv, clean_correct) -> None:
        for i in range(len(y)):
            item = (offset + i, x[i], x_adv[i], y[i], pred_adv[i])
            if len(self.first) < EXAMPLES_SHOWN:
                self.first.append(item)
            if len(self.kept) < EXAMPLES_SHOWN and bool(clean_correct[i]):
                self.kept.append(item)

    @classmethod
    def merged(cls, pickers: Sequence["ExamplePicker"]) -> "ExamplePicker":
        """The pickers of several ranks as one: the first few by sample index over all of them."""
        merged = cls(pickers[0].attack)
        merged.kept = sorted((item for p in pickers for item in p.kept), key=lambda item: item[0])[:EXAMPLES_SHOWN]
        merged.first = sorted((item for p in pickers for item in p.first), key=lambda item: item[0])[:EXAMPLES_SHOWN]
        return merged

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
    from ..report.rundir import attack_groups, same_samples, same_threat

    others = []
    for old in attack_groups(previous):
        if same_threat(old.get("threat"), group["threat"]):
            if same_samples(old, group):
                group = {**group, "results": {**(old.get("results") or {}), **group["results"]}}
            continue  # the same threat on other samples: replaced by the new run
        others.append(old)
    return {**group, "dataset": dataset, "other_threats": others}


def _attack_params(attack) -> dict:
    keep = ("steps", "step_size", "restarts", "random_start", "init", "loss", "decay", "rho", "queries")
    return {k: getattr(attack, k) for k in keep if isinstance(getattr(attack, k, None), (int, float, str, bool))}


def _npz_bytes(**arrays) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
