"""``diagnose_into``: the gradient-masking checklist (masking.json), the gradient findings of a monitored training
(from gradflow.jsonl) and, on request, curvature with its plots, into diagnosis.json.

``gradguard.workflow`` re-exports ``diagnose_into``; ``gradguard diagnose`` and the demo call it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..layout import DIAGNOSIS_FILE, GRADFLOW_FILE, HESSIAN_DENSITY_PLOT, INPUT_CURVATURE_PLOT, MASKING_FILE, PLOTS_DIR
from .context import device_record, iter_batches, test_samples


def diagnose_into(run_dir: Path, model, dataset, threat, *, samples: int, curvature: bool, seed: int, device,
                  channels_last: bool = False) -> dict:
    """Masking checklist (masking.json) + gradient findings from gradflow.jsonl + curvature (diagnosis.json).

    The checklist compares attacks on one small set of samples against each other, so it is not sharded: under
    torchrun rank 0 runs and writes it and hands the result to the other ranks, which wait."""
    from ..attacks.base import prepare_model
    from ..runtime import distributed

    model = prepare_model(model, device, channels_last=channels_last)
    record = device_record(device, channels_last=channels_last)
    return distributed.rank0_first(lambda: _diagnose(run_dir, model, dataset, threat, samples=samples,
                                                     curvature=curvature, seed=seed, device=device, record=record))


def _diagnose(run_dir: Path, model, dataset, threat, *, samples: int, curvature: bool, seed: int, device,
              record: dict) -> dict:
    from ..diagnostics import check_masking
    from ..io import atomic_write_json, atomic_write_text
    from ..report.rundir import read_json, read_jsonl

    data = test_samples(dataset)
    masking = check_masking(model, data, threat, n_samples=samples, seed=seed)
    diagnosis = dict(read_json(run_dir / DIAGNOSIS_FILE) or {})
    records = read_jsonl(run_dir / GRADFLOW_FILE)
    if records:
        from ..diagnostics import findings_from_records

        diagnosis["gradient_findings"] = [f.to_dict() for f in findings_from_records(records)]
    if curvature:
        diagnosis["curvature"] = _curvature_into(run_dir, model, data, samples=samples, seed=seed, device=device)
    diagnosis["masking_verdict"] = masking.verdict
    diagnosis["run"] = {**record, "world_size": 1}  # the checklist itself ran in one process
    atomic_write_text(run_dir / MASKING_FILE, masking.to_json())
    atomic_write_json(run_dir / DIAGNOSIS_FILE, diagnosis)
    return {"masking": json.loads(masking.to_json()), "diagnosis": diagnosis}


def _curvature_into(run_dir: Path, model, data, *, samples: int, seed: int, device) -> dict:
    """Hessian top-k, trace, density and per-layer table on the first min(64, samples) test images, and the
    input-curvature distribution over ``samples`` images; the density and distribution plots go to plots/."""
    from ..diagnostics.curvature import curvature_summary
    from ..io import atomic_write_bytes
    from ..report import plots

    xb, yb = next(iter_batches(data, min(64, samples)))
    batches = ((x.to(device), y.to(device)) for x, y in iter_batches(data, 256, limit=samples))
    result = curvature_summary(model, xb.to(device), yb.to(device), input_data=batches, seed=seed)
    density, inputs = result["density"], result["input_curvature"]
    atomic_write_bytes(run_dir / PLOTS_DIR / HESSIAN_DENSITY_PLOT,
                       plots.hessian_density(density["grid"], density["density"], result["top_eigenvalues"]["values"]))
    atomic_write_bytes(run_dir / PLOTS_DIR / INPUT_CURVATURE_PLOT,
                       plots.input_curvature_histogram(inputs["values"], inputs["quantiles"]))
    return result
