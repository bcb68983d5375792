"""How much AutoAttack's reference Square alone moves a result from one seed to the next (issue 22's noise floor).

On the samples the reference's APGD-CE, APGD-T and FAB-T left robust (read from the reference result cached by
``bench/adaptive_suite.py --reference-cache``), AutoAttack's own Square (``version="standard"``: 5 000 queries,
its schedule, 1 restart) is run again with other seeds; the samples each run breaks are compared with those of
the cached run (seed 0). Two runs of the same reference differ by this many samples on this model, whatever the
suite — the floor under any "at most k samples above the reference" comparison.

    python bench/reference_noise.py --models recipe --recipe RUN_DIR --norm l2 --n-eval 1000 --seeds 1 2
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
from adaptive_suite import THREATS  # noqa: E402
from cifar_suite import checked_robust  # noqa: E402
from common import load_fashion_mnist, run_header, write_json  # noqa: E402
from gradguard import L2, Linf  # noqa: E402
from suite_stages import load_models  # noqa: E402

SQUARE = 3  # the reference's stage index of Square in its cached broken_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs=1, default=["recipe"])
    parser.add_argument("--recipe", type=Path)
    parser.add_argument("--norm", choices=list(THREATS), default="l2")
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reference-cache", type=Path, default=HERE / "out" / "adaptive_suite" / "ref")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "reference-noise.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from autoattack import AutoAttack

    name = args.models[0]
    model = load_models([name], args.recipe)[name][0].eval()
    cached = json.loads((args.reference_cache / f"reference-{name}-{args.norm}-{args.n_eval}.json").read_text())
    broken_by = torch.tensor(cached["broken_by"])
    candidates = ((broken_by == -1) | (broken_by == SQUARE)).nonzero().squeeze(1)
    seed0 = set(candidates[broken_by[candidates] == SQUARE].tolist())
    _, _, x_test, y_test = load_fashion_mnist()
    x, y = x_test[:args.n_eval][candidates], y_test[:args.n_eval][candidates]
    eps = THREATS[args.norm]
    threat = Linf(eps) if args.norm == "linf" else L2(eps)
    result = run_header(model=name, norm=args.norm, eps=eps, n_eval=args.n_eval, attacked=len(candidates),
                        runs=[{"seed": 0, "broke": len(seed0), "samples": sorted(seed0), "source": "cached"}])
    for seed in args.seeds:
        aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=eps, version="standard", seed=seed,
                        device="cpu", verbose=False)
        aa.square.seed = seed
        began = time.perf_counter()
        adversarial = aa.square.perturb(x, y)
        robust, _ = checked_robust(model, threat, x, y, adversarial)
        broke = set(candidates[~robust].tolist())
        result["runs"].append({"seed": seed, "broke": len(broke), "samples": sorted(broke),
                               "only_this_seed": len(broke - seed0), "only_seed_0": len(seed0 - broke),
                               "seconds": round(time.perf_counter() - began, 1)})
        print(result["runs"][-1] | {"samples": "..."}, flush=True)
        write_json(args.json, result)


if __name__ == "__main__":
    main()
