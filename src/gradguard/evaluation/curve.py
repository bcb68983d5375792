"""evaluate_curve(): worst-case robust accuracy at several eps, reusing the one sound implication.

A sample broken at a smaller eps stays broken at every larger one (the eps-ball grows), so at each eps only the
samples robust at the previous one are attacked; each block keeps counts only (``_curve_block``), summed over
blocks and ranks into a ``RobustnessCurve`` (``results.py``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..attacks.base import model_guard
from ..errors import ConfigError, InputError
from ..models.outputs import as_logits_model
from ..threat import ThreatModel, check_threat
from .cascade import Cascade, check_model
from .distributed import check_same_stream, resolve_shard
from .results import RobustnessCurve
from .stream import Block, BlockSource, progress_blocks, release_freed_memory
from .suites import procedure_of, resolve_suite


def evaluate_curve(
    model: nn.Module,
    data: Any,
    threat: ThreatModel,
    eps_values: Iterable[float],
    suite: str | Sequence[Any] = "quick",
    *,
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
    max_samples: int | None = None,
    distributed: bool | None = None,
    amp: str | None = None,
    compile: bool = False,
) -> RobustnessCurve:
    """Worst-case robust accuracy at each eps in ``eps_values`` (sorted ascending in the result).

    Work is reused where it is sound: the eps-ball grows with eps, so a sample broken at a smaller eps stays
    broken at every larger one and is not attacked again; at each eps only the samples robust at the previous
    eps are attacked. (The converse — robust at a larger eps implies robust at a smaller one — is true of the
    model but not of heuristic attacks, so it is never used.) The curve is therefore non-increasing.
    """
    started = time.perf_counter()
    check_model(model)
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    check_threat(threat)
    eps_list = _eps_values(eps_values)
    if procedure_of(suite) is not None:
        raise ConfigError(f"suite: {suite!r} is a procedure (its escalations depend on evidence from the whole "
                          "evaluation) and has no curve; use a list suite for the curve, e.g. 'quick'")
    largest = threat.with_eps(eps_list[-1])  # an eps in the wrong units is refused (L2 / L1: at the first block)
    specs = resolve_suite(suite, amp=amp, compile=compile)
    source = BlockSource(data, largest, batch_size, max_samples)
    shard = resolve_shard(distributed)
    cascade = Cascade(model, specs, seed)
    tallies: list[dict] = []
    with model_guard(model):
        for index, read in progress_blocks(source, progress, shard):
            block = read() if index == 0 or shard.owns(index) else None
            if index == 0 and shard.active:
                assert block is not None
                check_same_stream(shard, source.n, block.fingerprint())
            if block is not None and shard.owns(index):
                tallies.append(_curve_block(cascade, block, threat, eps_list))
                release_freed_memory()
    total = _sum_tallies(shard.gather(tallies), len(eps_list))
    n = total["n"]
    if n == 0:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    return RobustnessCurve(eps=eps_list, robust_accuracy=[r / n for r in total["robust"]],
                           clean_accuracy=total["clean"] / n, n_samples=n, threat=threat.to_dict(),
                           suite=[s.label for s in specs],
                           per_attack=[{label: count / n for label, count in table.items()}
                                       for table in total["survivors"]],
                           attacked=total["attacked"], elapsed_s=round(time.perf_counter() - started, 3), seed=seed)


def _curve_block(cascade: Cascade, block: Block, threat: ThreatModel, eps_list: list[float]) -> dict:
    """Counts of one block at every eps: a sample broken at a smaller eps is not attacked at the larger ones."""
    x, y = block.x.to(cascade.device), block.y.to(cascade.device)
    clean_pred = cascade.predict(x, y)
    robust = clean_pred == y
    tally: dict = {"n": int(y.shape[0]), "clean": int(robust.sum()), "attacked": [], "robust": [], "survivors": []}
    for i, eps in enumerate(eps_list):
        tally["attacked"].append(int(robust.sum()))
        result = cascade.run(x, y, robust, clean_pred, threat.with_eps(eps), block.index, i * len(cascade.specs),
                             keep_adversarial=False)
        robust = result.robust
        tally["robust"].append(int(robust.sum()))
        tally["survivors"].append(result.survivors)
    return tally


def _sum_tallies(tallies: list[dict], n_eps: int) -> dict:
    total: dict = {"n": 0, "clean": 0, "attacked": [0] * n_eps, "robust": [0] * n_eps,
                   "survivors": [{} for _ in range(n_eps)]}
    for tally in tallies:
        total["n"] += tally["n"]
        total["clean"] += tally["clean"]
        for i in range(n_eps):
            total["attacked"][i] += tally["attacked"][i]
            total["robust"][i] += tally["robust"][i]
            for label, count in tally["survivors"][i].items():
                total["survivors"][i][label] = total["survivors"][i].get(label, 0) + count
    return total


def _eps_values(eps_values: Iterable[float]) -> list[float]:
    try:
        values = sorted(float(e) for e in eps_values)
    except (TypeError, ValueError):
        raise ConfigError(f"eps_values: expected a list of numbers, got {eps_values!r}") from None
    if not values or any(not math.isfinite(e) or e < 0 for e in values):
        raise ConfigError(f"eps_values: expected a non-empty list of finite numbers >= 0, got {eps_values!r}")
    return values
