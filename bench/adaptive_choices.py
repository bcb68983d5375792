"""The two measurements behind the adaptive suite's fourth-round choices (issue 22), on the stand-in model.

``fab``: FAB-T (targets by clean logit, early stop) on the samples the adaptive suite's L2 run left robust, for
1–3 targets and 10–100 steps: which samples each setting breaks and its forward-equivalents (forwards + 2 ×
gradients). Chose the core stage "FAB-T, 2 targets, 100 steps" in L2 / L1.

``square``: how often one 5 000-query Square run breaks given samples, seed by seed, with gradguard's Square (its
window schedule rescaled to the budget, or laid out for 10 000 queries as AutoAttack's "standard" does) and with
AutoAttack's own ``SquareAttack``. Chose ``schedule_queries=10000`` for the adaptive suite's Square escalation.

``evidence`` (fifth round): on the samples an earlier adaptive run left robust in L2, the per-sample measurements
the new indicators threshold — the white-box core's smallest margin (APGD-CE, ranked APGD-T on 3 targets), FAB-T's
smallest adversarial distance (2 targets, the core stage) and the 500-query Square probe's margin, seed by seed —
and, for each candidate threshold, how many samples it flags and which of the reference's extra breaks it catches.
Chose ``near_distance=1.25``, ``probe_progress=0.6`` and ``probe_rival=2``.

    python bench/adaptive_choices.py fab --adaptive-json bench/results/adaptive-suite-4-standin.json
    python bench/adaptive_choices.py evidence --model recipe --recipe RUN_DIR --adaptive-json bench/results/adaptive-suite-4-recipe.json
    python bench/adaptive_choices.py evidence --model plain --adaptive-json bench/results/adaptive-suite-4-standin.json
    python bench/adaptive_choices.py square --model kwta --samples 13 56 61 --seeds 6
    python bench/adaptive_choices.py square --model plain --samples 67 --seeds 8 --queries 500 1000 5000

Needs the stand-in ``bench/out/adaptive_suite/fmnist-pgd-quick.safetensors`` (``bench/adaptive_suite.py
--models fmnist-pgd-quick --train-missing`` makes it) and, for ``square``, AutoAttack
(``pip install --no-deps ../shared/vendor/auto-attack``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from adaptive_suite import kwta  # noqa: E402
from cifar_suite import checked_robust  # noqa: E402
from common import load_fashion_mnist, run_header, write_json  # noqa: E402
from gradguard import L2  # noqa: E402
from gradguard.attacks.apgd import APGD, APGDT  # noqa: E402
from gradguard.attacks.fab import FAB  # noqa: E402
from gradguard.attacks.losses import margin  # noqa: E402
from gradguard.attacks.square import Square  # noqa: E402
from gradguard.models import load  # noqa: E402

STAND_IN = HERE / "out" / "adaptive_suite" / "fmnist-pgd-quick.safetensors"


def broken(model, threat, x_adv, x, y) -> torch.Tensor:
    """Per sample: misclassified at a point inside the ball (``cifar_suite.checked_robust``'s re-check)."""
    return ~checked_robust(model, threat, x, y, x_adv)[0]


def fab_split(args) -> list[dict]:
    model = load(STAND_IN).eval()
    _, _, x, y = load_fashion_mnist()
    rows = [r for r in json.loads(args.adaptive_json.read_text())["rows"] if r["norm"] == "l2"]
    robust = torch.tensor(rows[0]["adaptive"]["robust"], dtype=torch.bool)
    index = robust.nonzero().squeeze(1)
    xs, ys, threat = x[index], y[index], L2(1.0)
    out = []
    for steps in args.steps:
        for targets in (1, 2, 3):
            began = time.perf_counter()
            found = FAB(model, threat, targeted=True, n_target_classes=targets, steps=steps).run(xs, ys)
            hit = broken(model, threat, found.x_adv, xs, ys)
            out.append({"steps": steps, "targets": targets, "attacked": len(index), "broke": index[hit].tolist(),
                        "forward_equivalents": found.n_forward + 3 * found.n_grad,
                        "seconds": round(time.perf_counter() - began, 1)})
            print(out[-1], flush=True)
    return out


def square_seeds(args) -> list[dict]:
    from autoattack.square import SquareAttack

    base = load(STAND_IN).eval()
    model = kwta(base) if args.model == "kwta" else base
    _, _, x, y = load_fashion_mnist()
    xs, ys, threat = x[args.samples], y[args.samples], L2(1.0)
    out = []
    for queries in args.queries:
        counts = {"rescaled": torch.zeros(len(ys)), "laid out for 10000": torch.zeros(len(ys)),
                  "autoattack": torch.zeros(len(ys))}
        for seed in range(args.seeds):
            for name, schedule in (("rescaled", None), ("laid out for 10000", 10000)):
                found = Square(model, threat, queries=queries, seed=seed, schedule_queries=schedule).run(xs, ys)
                counts[name] += broken(model, threat, found.x_adv, xs, ys).float()
            reference = SquareAttack(model, p_init=0.8, n_queries=queries, eps=1.0, norm="L2", n_restarts=1,
                                     seed=seed, verbose=False, device="cpu", resc_schedule=False)
            counts["autoattack"] += broken(model, threat, reference.perturb(xs, ys), xs, ys).float()
        out.append({"model": args.model, "queries": queries, "seeds": args.seeds, "samples": args.samples,
                    "runs_that_broke_each_sample": {k: v.int().tolist() for k, v in counts.items()}})
        print(out[-1], flush=True)
    return out


def evidence_thresholds(args) -> list[dict]:
    """Where the reference's extra breaks rank among an L2 run's survivors by each per-sample measurement."""
    if args.model == "recipe":
        from suite_stages import load_models

        model = load_models(["recipe"], args.recipe)["recipe"][0].eval()
    else:
        model = load(STAND_IN).eval()
    _, _, x, y = load_fashion_mnist()
    row = next(r for r in json.loads(args.adaptive_json.read_text())["rows"] if r["norm"] == "l2")
    survivors = [i for i, p in enumerate(row["adaptive"]["provenance"]) if p.startswith("robust")]
    missed = set(row["only_reference_broke"])
    xs, ys, threat = x[survivors], y[survivors], L2(1.0)
    with torch.no_grad():
        clean = margin(model(xs), ys, True)
    white = torch.full_like(clean, float("inf"))
    for attack in (APGD(model, threat, loss="ce", seed=0), APGDT(model, threat, n_target_classes=3, seed=0,
                                                                  ranking="linearised")):
        white = torch.minimum(white, margin(attack.run(xs, ys).logits, ys, True))
    fab = FAB(model, threat, targeted=True, n_target_classes=2, seed=0)
    fab.run(xs, ys)
    assert fab.min_distance is not None
    measures = {"fab_distance / eps": fab.min_distance / threat.eps, "white-box margin / clean": white / clean}
    rules = []
    for seed in range(args.seeds):
        probe = margin(Square(model, threat, queries=500, seed=seed).run(xs, ys).logits, ys, True)
        measures[f"probe margin / clean (seed {seed})"] = probe / clean
        measures[f"probe margin / white-box (seed {seed})"] = probe / white
        for rival in (1.0, 1.5, 2.0, float("inf")):  # the registered rule: below 0.6 of clean and 2x white-box
            flagged = ((probe < 0.6 * clean) & (probe < rival * white)).nonzero().squeeze(1).tolist()
            rules.append({"rule": f"probe < 0.6 clean and < {rival:g} x white-box", "seed": seed,
                          "flagged": len(flagged), "caught": sorted(survivors[k] for k in flagged
                                                                    if survivors[k] in missed)})
            print(rules[-1], flush=True)
    out: list[dict] = rules
    for name, values in measures.items():
        order = values.argsort().tolist()
        ranks = {survivors[k]: rank for rank, k in enumerate(order) if survivors[k] in missed}
        at_threshold = {str(t): {"flagged": int((values <= t).sum()),
                                 "caught": sorted(survivors[k] for k in (values <= t).nonzero().squeeze(1).tolist()
                                                  if survivors[k] in missed)} for t in args.thresholds}
        out.append({"measure": name, "survivors": len(survivors), "reference_only": sorted(missed),
                    "rank_of_each": ranks, "at_threshold": at_threshold})
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fab", "square", "evidence"])
    parser.add_argument("--recipe", type=Path, help="evidence --model recipe: the TRADES recipe's run directory")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.55, 0.6, 0.65, 0.9, 1.15, 1.25, 1.5])
    parser.add_argument("--adaptive-json", type=Path, help="fab: a bench/adaptive_suite.py result with an L2 row")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30, 50, 100])
    parser.add_argument("--model", choices=["plain", "kwta", "recipe"], default="kwta")
    parser.add_argument("--samples", type=int, nargs="+", default=[13, 56, 61])
    parser.add_argument("--seeds", type=int, default=6, help="square: runs per sample; evidence: probe seeds")
    parser.add_argument("--queries", type=int, nargs="+", default=[5000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"fab": fab_split, "square": square_seeds, "evidence": evidence_thresholds}[args.what](args)
    if args.json:
        write_json(args.json, {**run_header(what=args.what), "rows": rows})


if __name__ == "__main__":
    main()
