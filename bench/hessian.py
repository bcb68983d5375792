"""gradguard's curvature diagnostics against PyHessian: same model, same batch, same settings, interleaved.

    pip install --no-deps pyhessian      # bench-only, never a gradguard dependency
    OMP_NUM_THREADS=1 python bench/hessian.py [--iters 20] [--tol 1e-3] [--probes 50] [--repeats 3]

The literature's small Fashion-MNIST CNN, trained for one short Adam epoch on 10 000 images, and a batch of
1 000 test images. Each round times, in alternating order and from a cold start (every timing includes
building the first gradient graph, as PyHessian's constructor does):

- top eigenvalue: PyHessian's power iteration (``eigenvalues(maxIter=iters, tol=tol)``), gradguard's
  Lanczos (``hessian_eigenvalues(k=1, iters=iters, tol=tol)``, what ``top_hessian_eigenvalue`` runs) and
  gradguard's power iteration (``hessian_power_iteration``, PyHessian's algorithm, to price the products);
- the same power iteration at a fixed ``iters`` products (tol=0): the price of one product in each;
- trace: Hutchinson with ``probes`` Rademacher probes in both (tol=0: both run every probe), and gradguard's
  deflated Hutchinson (``deflation=probes // 3`` Lanczos vectors, then probes: the same number of products);
  the reference trace is a deflated run with 3x the products and another seed.

Reported: each value, products used, median seconds and the time ratios gradguard / PyHessian; a converged
Lanczos run (tol=1e-8) is the reference eigenvalue. Targets (issue 14): values within 1 %, time <= 0.7x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmnist_cnn, load_fashion_mnist, train_quick  # noqa: E402
from gradguard.diagnostics import hessian_eigenvalues, hessian_power_iteration, hessian_trace  # noqa: E402


def pyhessian_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, tol: float) -> dict:
    import pyhessian  # noqa: F401  (the package exports a class named like its module: read the module itself)

    module: Any = sys.modules["pyhessian.hessian"]  # patched below

    products = 0
    plain = module.hessian_vector_product

    def counted(*args: Any) -> Any:  # count PyHessian's products (it does not report them)
        nonlocal products
        products += 1
        return plain(*args)

    module.hessian_vector_product = counted
    try:
        computer = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, _ = computer.eigenvalues(maxIter=iters, tol=tol, top_n=1)
    finally:
        module.hessian_vector_product = plain
    model.zero_grad(set_to_none=True)  # PyHessian leaves .grad (with a graph) on the parameters
    return {"value": float(values[0]), "iterations": products}


def pyhessian_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probes: int) -> dict:
    from pyhessian import hessian

    computer = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    samples = computer.trace(maxIter=probes, tol=0.0)
    model.zero_grad(set_to_none=True)
    return {"value": float(statistics.mean(samples)), "iterations": len(samples),
            "standard_error": statistics.stdev(samples) / len(samples) ** 0.5}


def timed_rounds(variants: dict[str, Callable[[], dict]], repeats: int) -> dict[str, dict[str, Any]]:
    """Every variant once per round, order reversed every other round; median seconds and the last result."""
    results: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in variants}
    names = list(variants)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            began = time.perf_counter()
            outcome = variants[name]()
            results[name]["seconds"].append(time.perf_counter() - began)
            results[name].update(outcome)
    for entry in results.values():
        entry["median_s"] = statistics.median(entry["seconds"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        raise SystemExit("PyHessian is not installed: pip install --no-deps pyhessian") from None
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    model = train_quick(fmnist_cnn(), x_train[:10000], y_train[:10000], epochs=1).eval()
    x, y = x_test[: args.batch], y_test[: args.batch]

    reference = _eigen(hessian_eigenvalues(model, x, y, k=1, iters=100, tol=1e-8))["value"]
    top = timed_rounds({
        "pyhessian power": lambda: pyhessian_top(model, x, y, args.iters, args.tol),
        "gradguard lanczos": lambda: _eigen(hessian_eigenvalues(model, x, y, k=1, iters=args.iters, tol=args.tol)),
        "gradguard power": lambda: _power(hessian_power_iteration(model, x, y, iters=args.iters, tol=args.tol)),
    }, args.repeats)
    fixed = timed_rounds({
        "pyhessian power": lambda: pyhessian_top(model, x, y, args.iters, 0.0),
        "gradguard power": lambda: _power(hessian_power_iteration(model, x, y, iters=args.iters, tol=0.0)),
    }, args.repeats)
    deflation = args.probes // 3
    trace = timed_rounds({
        "pyhessian hutchinson": lambda: pyhessian_trace(model, x, y, args.probes),
        "gradguard hutchinson": lambda: _trace(hessian_trace(model, x, y, iters=args.probes, tol=0.0)),
        "gradguard deflated": lambda: _trace(hessian_trace(model, x, y, iters=args.probes, tol=0.0,
                                                           deflation=deflation)),
    }, args.repeats)
    reference_trace = _trace(hessian_trace(model, x, y, iters=3 * args.probes, tol=0.0, deflation=args.probes,
                                           seed=1))
    base_top, base_trace = top["pyhessian power"], trace["pyhessian hutchinson"]
    summary = {
        "settings": {**vars(args), "json": None, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "reference_top_eigenvalue": reference,
        "reference_trace": reference_trace,
        "top": top, "fixed_products": fixed, "trace": trace,
        "ratios": {
            "lanczos / pyhessian time": top["gradguard lanczos"]["median_s"] / base_top["median_s"],
            "power / pyhessian time": top["gradguard power"]["median_s"] / base_top["median_s"],
            "power / pyhessian time, fixed products": fixed["gradguard power"]["median_s"]
            / fixed["pyhessian power"]["median_s"],
            "trace time": trace["gradguard hutchinson"]["median_s"] / base_trace["median_s"],
            "deflated trace time": trace["gradguard deflated"]["median_s"] / base_trace["median_s"],
            "deflated / pyhessian trace standard error": trace["gradguard deflated"]["standard_error"]
            / base_trace["standard_error"],
            "deflated trace / reference": trace["gradguard deflated"]["value"] / reference_trace["value"],
            "pyhessian trace / reference": base_trace["value"] / reference_trace["value"],
            "lanczos / pyhessian value": top["gradguard lanczos"]["value"] / base_top["value"],
            "trace value": trace["gradguard hutchinson"]["value"] / base_trace["value"],
        },
    }
    for section in (top, fixed, trace):
        for name, entry in section.items():
            print(f"{name:22s} value={entry['value']:.5g} products={entry.get('iterations', '-')} "
                  f"median={entry['median_s']:.3f}s  se={entry.get('standard_error', '-')}")
    print(f"reference top eigenvalue (Lanczos, tol 1e-8): {reference:.6g}")
    print(f"reference trace ({reference_trace['iterations']} products, deflated): {reference_trace['value']:.6g} "
          f"± {reference_trace['standard_error']:.3g}")
    print(json.dumps(summary["ratios"], indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))


def _eigen(estimate: Any) -> dict:
    return {"value": estimate.values[0], "iterations": estimate.iterations, "converged": estimate.converged}


def _power(estimate: Any) -> dict:
    return {"value": estimate.value, "iterations": estimate.iterations, "converged": estimate.converged}


def _trace(estimate: Any) -> dict:
    return {"value": estimate.value, "iterations": estimate.iterations, "standard_error": estimate.standard_error}


if __name__ == "__main__":
    main()
