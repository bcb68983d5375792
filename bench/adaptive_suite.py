"""The "adaptive" suite against AutoAttack's reference "standard", side by side on the same images (issue 22).

For each benchmark model (bench/suite_stages.py's: the standard, fast-FGSM and PGD-trained Fashion-MNIST CNNs, the
TRADES recipe CNN, the CIFAR-shaped PreActResNet-18; a model that is not on disk is skipped with the command that
makes it, unless ``--train-missing`` trains a quick stand-in, named so), in L∞ (eps 0.1) and L2 (eps 1.0), and for
the masked models built here on top of the first model found —

  * ``x1e4``: logits × 10⁴ (a saturated softmax: CE gradients underflow),
  * ``quant8``: the input rounded to multiples of 1/8 first (zero gradients everywhere),
  * ``noise``: Gaussian input noise σ = 0.05 at every call (a randomised model),
  * ``kwta``: every ReLU replaced by k-winners-take-all (the top 10 % of each layer's activations per sample),

it runs AutoAttack's reference (`pip install --no-deps ../shared/vendor/auto-attack`, version "standard", called as
``run_standard_evaluation`` calls it, via cifar_suite.reference_stages) and gradguard's ``adaptive`` suite on the same
first ``--n-eval`` test images, in alternating order, and records robust accuracy (re-scored from the model's
predictions), wall time, and the **passes** of both: every call to the model is counted by a wrapper (rows
forward) and a hook on its output (rows backward); forward-equivalents = forwards + 2 × backwards. For ``adaptive``
it also records the evidence, the escalations and the stage table.

    python bench/adaptive_suite.py --models fmnist-pgd --n-eval 100                  # results/adaptive-suite.json
    python bench/adaptive_suite.py --models fmnist-pgd --masked --norms linf --n-eval 50
    python bench/adaptive_suite.py --table                                            # the markdown table
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_suite import checked_robust, reference_stages, run_cascade  # noqa: E402
from common import fmnist_cnn, load_fashion_mnist, run_header, train_quick, write_json  # noqa: E402
from gradguard import L2, Linf, evaluate  # noqa: E402
from gradguard.evaluation.evidence import randomised  # noqa: E402
from suite_stages import MODELS, load_models  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "adaptive-suite.json"
THREATS = {"linf": 0.1, "l2": 1.0}


class Counted(nn.Module):
    """The model, unchanged, counting the rows of every forward pass and of every backward pass through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forwards += x.shape[0]
        if out.requires_grad:
            rows = x.shape[0]
            out.register_hook(lambda grad: self._backward(rows))
        return out

    def _backward(self, rows: int) -> None:
        self.backwards += rows

    def reset(self) -> dict:
        counts = {"forwards": self.forwards, "backwards": self.backwards,
                  "forward_equivalents": self.forwards + 2 * self.backwards}
        self.forwards = self.backwards = 0
        return counts


# -- the masked models ---------------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float = 1e4) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


class Quantised(nn.Module):
    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class Noisy(nn.Module):
    def __init__(self, model: nn.Module, sigma: float = 0.05) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


class KWTA(nn.Module):
    """k-winners-take-all (Xiao et al., ICLR 2020): per sample keep the top ``ratio`` of the layer's activations."""

    def __init__(self, ratio: float = 0.1) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        flat = x.flatten(1)
        k = max(1, int(self.ratio * flat.shape[1]))
        threshold = flat.topk(k, dim=1).values[:, -1:]
        return (flat * (flat >= threshold)).view_as(x)


def kwta(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, KWTA())
    return model.eval()


MASKED = {"x1e4": Scaled, "quant8": Quantised, "noise": Noisy, "kwta": kwta}


# -- one comparison -------------------------------------------------------------------------------
def compare(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, reference_first: bool,
            suite: str, cache: Path | None = None) -> dict:
    """Both suites on (x, y) in ``norm``; ``cache``: a folder where the reference's result (deterministic: seed 0)
    is kept per (model, norm, N) and read back on later runs instead of being recomputed (the row says so)."""
    eps = THREATS[norm]
    threat = Linf(eps) if norm == "linf" else L2(eps)
    counted = Counted(model).eval()
    row: dict = {"model": name, "norm": norm, "eps": eps, "n_eval": len(y)}
    points: dict = {}  # each suite's final points

    def reference() -> dict:
        cached = cache / f"reference-{name}-{norm}-{len(y)}.json" if cache is not None else None
        if cached is not None and cached.exists():
            out = json.loads(cached.read_text())
            print(f"  (reference read from {cached}, run {out.get('ran_at', '?')})", flush=True)
            if cached.with_suffix(".safetensors").exists():  # no pickle is ever loaded
                points["reference"] = load_file(cached.with_suffix(".safetensors"))["x_adv"]
            return {**out, "cached": str(cached)}
        counted.reset()
        began = time.perf_counter()
        kept: dict = {}
        out = run_cascade(counted, threat, x, y, reference_stages(counted, eps, norm), lambda r: None,
                          batch_size=len(y), points=kept)
        out["time_s"] = round(time.perf_counter() - began, 2)
        out["passes"] = counted.reset()
        out["ran_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        points["reference"] = kept["x_adv"]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(out))
            save_file({"x_adv": kept["x_adv"].contiguous()}, cached.with_suffix(".safetensors"))
        return out

    def ours() -> dict:
        counted.reset()
        began = time.perf_counter()
        report = evaluate(counted, (x, y), threat, suite, batch_size=len(y), seed=0, return_adversarial=True)
        seconds = time.perf_counter() - began
        assert report.x_adv is not None
        points[suite] = report.x_adv
        still, inside = checked_robust(model, threat, x, y, report.x_adv)
        clean = report.clean_correct
        return {"robust_accuracy": float((clean & still).float().mean()), "robust": (clean & still).int().tolist(),
                "reported_robust_accuracy": report.robust_accuracy, "points_inside": inside,
                "time_s": round(seconds, 2), "passes": counted.reset(),
                "stages": {label: {"accuracy": acc, "time_s": report.attack_time_s.get(label),
                                   **report.attack_budget.get(label, {})} for label, acc in report.per_attack.items()},
                "evidence_passes": report.attack_budget.get("evidence"),
                "evidence": {k: {"samples": v["samples"], "checked": v["checked"], "model_level": v["model_level"]}
                             for k, v in report.evidence.items()},
                "escalations": report.escalations,
                "provenance": report.provenance}

    order = [("reference", reference), (suite, ours)]
    for key, run in (order if reference_first else order[::-1]):
        print(f"{time.strftime('%H:%M:%S')} {name} {norm}: {key}", flush=True)
        row[key] = run()
        print(f"  {100 * row[key]['robust_accuracy']:6.2f} %  {row[key]['time_s']:8.1f} s  "
              f"{row[key]['passes']['forward_equivalents']} forward-equivalents", flush=True)
    ref, new = row["reference"], row[suite]
    row["time_ratio"] = round(new["time_s"] / max(ref["time_s"], 1e-9), 3)
    row["pass_ratio"] = round(new["passes"]["forward_equivalents"] / max(ref["passes"]["forward_equivalents"], 1), 3)
    row["samples_above_reference"] = round((new["robust_accuracy"] - ref["robust_accuracy"]) * len(y))
    if bool(randomised(model, x[:64], 64).any()) and "reference" in points:  # one draw per point is a coin flip: re-score both by a majority of draws
        clean = majority_correct(model, x, y)
        for key in ("reference", suite):
            row[key]["robust"] = (clean & (majority_correct(model, points[key], y) | ~threat.contains(
                points[key], x, tol=1e-5))).int().tolist()
            row[key]["one_draw_robust_accuracy"] = row[key]["robust_accuracy"]
            row[key]["robust_accuracy"] = sum(row[key]["robust"]) / len(y)
        row["rescored"] = f"majority of {RESCORE['votes']} draws per point (a randomised model)"
        row["samples_above_reference"] = sum(row[suite]["robust"]) - sum(row["reference"]["robust"])
    if "robust" in ref:  # per sample: robust for one suite, broken by the other
        pairs = list(zip(ref["robust"], new["robust"], strict=True))
        row["only_reference_broke"] = [i for i, (a, b) in enumerate(pairs) if b and not a]
        row["only_suite_broke"] = [i for i, (a, b) in enumerate(pairs) if a and not b]
    return row


RESCORE = {"votes": 101}  # --votes: draws per point when a randomised model's points are re-scored (11 until the fourth round)


def majority_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per sample: whether most of ``RESCORE["votes"]`` forward passes classify it correctly."""
    draws = RESCORE["votes"]
    with torch.no_grad():
        votes = torch.zeros(len(y), dtype=torch.long)
        for _ in range(draws):
            votes += torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).eq(y)
    return votes > draws // 2


SWEEPS: dict[str, dict[str, dict[str, dict]]] = {  # the core's budget splits: setting name -> {stage label: spec updates}
    "apgd-t": {f"targets={t} steps={n}": {"apgd-t-ranked": {"n_target_classes": t, "steps": n},
                                           "apgd-t-rest": {"first_target": t, "n_target_classes": 9 - t}}
               for t in (1, 2, 3) for n in (50, 100)},
    # FAB-T's core stage (L2 / L1): 0 targets = the stage left out
    "fab-t": {f"targets={t} steps={n}": {"fab-t-core": {"n_target_classes": t, "steps": n}} if t else
              {"fab-t-core": {"norms": ["l1"]}} for t in (0, 1, 2, 3) for n in ((100,) if t == 0 else (50, 100))},
}


def sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norms: list[str], stage: str) -> list[dict]:
    """The core's budget split for one stage (``SWEEPS``; everything else as registered): robust accuracy, per-sample
    outcomes and forward-equivalents of the whole suite per setting."""
    from gradguard.evaluation.suites import SUITES

    registered = [dict(s) for s in SUITES["adaptive"]]
    rows = []
    try:
        for norm in norms:
            threat = Linf(THREATS[norm]) if norm == "linf" else L2(THREATS[norm])
            for setting, updates in SWEEPS[stage].items():
                SUITES["adaptive"][:] = [{**spec, **updates.get(str(spec.get("label", spec["name"])), {})}
                                         for spec in registered]
                counted = Counted(model).eval()
                began = time.perf_counter()
                report = evaluate(counted, (x, y), threat, "adaptive", batch_size=len(y), seed=0)
                rows.append({"norm": norm, "stage": stage, "setting": setting,
                             "robust_accuracy": report.robust_accuracy, "time_s": round(time.perf_counter() - began, 2),
                             "passes": counted.reset(), "robust": report.robust.tolist(),
                             "escalations_ran": [e["stage"] for e in report.escalations if e["ran"]]})
                print({k: v for k, v in rows[-1].items() if k != "robust"}, flush=True)
    finally:
        SUITES["adaptive"][:] = registered
    return rows


def quick_models(names: list[str], x_train: torch.Tensor, y_train: torch.Tensor) -> dict:
    """Stand-ins for models not on disk (named "*-quick" in the results): the small CNN after one plain epoch or two
    fast-FGSM epochs at eps 0.1, trained here once and kept in bench/out/adaptive_suite/."""
    from gradguard.models import load, save

    found = {}
    for name in (n.removesuffix("-quick") for n in names):  # "fmnist-pgd-quick": the stand-in even if the real one is here
        if name not in ("fmnist-standard", "fmnist-fgsm-rs", "fmnist-pgd"):
            continue
        path = HERE / "out" / "adaptive_suite" / f"{name}-quick.safetensors"
        if path.exists():
            found[f"{name}-quick"] = load(path).eval()
            continue
        eps = 0.0 if name == "fmnist-standard" else 0.1
        model = train_quick(fmnist_cnn(), x_train, y_train, epochs=1 if eps == 0 else 2, eps=eps)
        path.parent.mkdir(parents=True, exist_ok=True)
        save(model, path, method="standard" if eps == 0 else "fgsm-rs", dataset="fashion-mnist")
        found[f"{name}-quick"] = model
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--norms", nargs="*", default=list(THREATS), choices=list(THREATS))
    parser.add_argument("--masked", action="store_true", help="also the masked models built on the first model")
    parser.add_argument("--only-masked", action="store_true", help="only the masked models")
    parser.add_argument("--kinds", nargs="*", default=list(MASKED), choices=list(MASKED), help="which masked models")
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--suite", default="adaptive")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--close-call", type=float, help="the adaptive suite's close_call fraction (default: the "
                        "registered one, gradguard.evaluation.suites.PROCEDURES)")
    parser.add_argument("--setting", nargs="*", default=[], metavar="KEY=VALUE", help="override the adaptive "
                        "suite's settings (gradguard.evaluation.suites.PROCEDURES), e.g. probe_fraction=0.25")
    parser.add_argument("--recipe", type=Path)
    parser.add_argument("--train-missing", action="store_true", help="train quick stand-ins for missing models")
    parser.add_argument("--json", type=Path, default=RESULT)
    parser.add_argument("--reference-cache", type=Path, help="keep the reference's results in this folder and reuse "
                        "them (per model, norm and N; the reference is seeded, so a rerun gives the same points)")
    parser.add_argument("--votes", type=int, default=RESCORE["votes"], help="draws per point when re-scoring a randomised "
                        "model's points by majority (default %(default)s: a point broken in 6 of 11 draws is a coin "
                        "flip under 11 votes, not under 101)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --json and exit")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), help="the core's budget split instead (apgd-t: targets "
                        "x steps of the ranked APGD-T stage; fab-t: of FAB-T's core stage), adaptive suite only, on "
                        "the first model")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(args.threads)
    RESCORE["votes"] = args.votes
    if args.close_call is not None:
        from gradguard.evaluation.suites import PROCEDURES

        PROCEDURES["adaptive"]["close_call"] = args.close_call
    for setting in args.setting:
        from gradguard.evaluation.suites import PROCEDURES

        key, _, value = setting.partition("=")
        if key not in PROCEDURES["adaptive"]:
            raise SystemExit(f"--setting: no adaptive setting {key!r}; one of {sorted(PROCEDURES['adaptive'])}")
        PROCEDURES["adaptive"][key] = float(value)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    models = {name: model for name, (model, _) in load_models(args.models, args.recipe).items()}
    if args.train_missing:
        torch.manual_seed(0)
        models.update(quick_models([m for m in args.models if m not in models], x_train, y_train))
    if not models:
        raise SystemExit("no model found; make one (see the messages above) or pass --train-missing")
    if args.sweep:
        name, model = next(iter(models.items()))
        write_json(args.json, {**run_header(n_eval=args.n_eval, model=name),
                               "sweep": sweep(model, x_test[:args.n_eval], y_test[:args.n_eval], args.norms,
                                              args.sweep)})
        return
    from gradguard.evaluation.suites import PROCEDURES

    result = run_header(n_eval=args.n_eval, suite=args.suite, threads=args.threads, rows=[],
                        settings=PROCEDURES.get(args.suite))
    base_name, base = next(iter(models.items()))
    todo = [] if args.only_masked else list(models.items())
    if args.masked or args.only_masked:
        todo += [(f"{base_name}+{kind}", build(base).eval()) for kind, build in MASKED.items()
                 if kind in args.kinds]
    cifar = x_test.new_zeros(0)
    for k, (name, model) in enumerate(todo):
        x, y = x_test[:args.n_eval], y_test[:args.n_eval]
        if name.startswith("cifar"):
            if not cifar.numel():
                from cifar_suite import fashion_mnist_as_cifar

                cifar = fashion_mnist_as_cifar()[2]  # (x_train, y_train, x_test, y_test)
            x = cifar[:args.n_eval]
        for norm in args.norms:
            torch.manual_seed(0)
            result["rows"].append(compare(name, model, x, y, norm, reference_first=k % 2 == 0, suite=args.suite,
                                         cache=args.reference_cache))
            write_json(args.json, result)
    print(table(result))


def table(result: dict) -> str:
    suite = result.get("suite", "adaptive")
    lines = [f"| model (N) | norm | reference acc. | {suite} acc. | above ref. (samples) | reference s | {suite} s | "
             "time ratio | reference fwd-eq | "
             f"{suite} fwd-eq | pass ratio | evidence fired | escalations ran |", "|" + "---|" * 13]
    for row in result["rows"]:
        ref, new = row["reference"], row[suite]
        fired = ", ".join(f"{k} {v['samples']}/{v['checked']}" + ("*" if v["model_level"] else "")
                          for k, v in new["evidence"].items() if v["samples"]) or "none"
        ran = ", ".join(f"{e['stage']} ({e['samples']}→{e['broke']})" for e in new["escalations"] if e["ran"]) or "none"
        lines.append(f"| {row['model']} ({row['n_eval']}) | {row['norm']} {row['eps']:g} | "
                     f"{100 * ref['robust_accuracy']:.2f} % | {100 * new['robust_accuracy']:.2f} % | "
                     f"{row['samples_above_reference']} | {ref['time_s']:.1f} | {new['time_s']:.1f} | "
                     f"{row['time_ratio']:.2f} | {ref['passes']['forward_equivalents']} | "
                     f"{new['passes']['forward_equivalents']} | {row['pass_ratio']:.2f} | {fired} | {ran} |")
    lines.append("")
    lines.append("Stage tables (" + suite + "): accuracy after each stage, seconds, per-sample gradients / forwards")
    for row in result["rows"]:
        stages = row[suite]["stages"]
        cells = "; ".join(f"{label} {100 * s['accuracy']:.1f} % {s.get('time_s') or 0:.1f} s "
                          f"{s.get('gradients', 0)}g/{s.get('forwards', 0)}f" for label, s in stages.items())
        lines.append(f"- {row['model']} {row['norm']}: {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
