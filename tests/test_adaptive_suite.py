"""The "adaptive" suite: exact target ranking on a linear model, each piece of evidence firing on a model planted to
trigger it and quiet on an honest one, escalation reaching standard's outcome on a masked model, block / resume /
torchrun invariance, and the usual invariants (points in the ball, model untouched)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from cli_helpers import DIGITS_MLP_SOURCE
from conftest import train_classifier
from gradguard import L2, Linf, evaluate
from gradguard.attacks.apgd import APGDT, linearised_distances
from gradguard.errors import InputError
from gradguard.evaluation.suites import PROCEDURES, SUITES, procedure_of

EPS = 0.1
N = 48


@pytest.fixture(scope="module")
def honest(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return train_classifier(model, digits.x_train, digits.y_train, epochs=15)


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_test[:N], digits.y_test[:N]


class Scaled(nn.Module):
    """Logits × 10⁴: the same predictions, a cross-entropy gradient that underflows to zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


class Quantised(nn.Module):
    """The input rounded to multiples of 1/8 first: zero gradients for every loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


class Noisy(nn.Module):
    """Gaussian input noise (σ = 0.05) at every call: a randomised model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Reversed(nn.Module):
    """The model's forward, the negated input gradient: ascent walks downhill, the loss never rises."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_Reverse.apply(x))


class Jagged(nn.Module):
    """A step function of the input added without a gradient (thermometer-like): the gradient describes a smooth
    model, the function jumps every π/500 in each pixel — shattered gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + (0.05 * torch.sign(torch.sin(500 * x))).detach())


def _evidence(report, name: str) -> dict:
    return report.evidence[name]


def _cheaper_square(probe: int, full: int) -> list[dict]:
    """The adaptive suite's specs with smaller Square budgets (the probe's and the escalation's), as a copy."""
    queries = {"square-probe": probe, "square": full}
    return [{**spec, "queries": queries[spec.get("label", spec["name"])]} if spec["name"] == "square" else dict(spec)
            for spec in SUITES["adaptive"]]


def _escalation(report, stage: str) -> dict:
    return next(e for e in report.escalations if e["stage"] == stage)


def _linear_problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, x, clean logits, labels = its predictions, weight): a 10-class linear model on 400 inputs in
    [0.4, 0.6]^30, where the smallest margin and the boundaries in an L2 ball have closed forms."""
    torch.manual_seed(seed)
    layer = nn.Linear(30, 10)
    model = nn.Sequential(nn.Flatten(), layer).eval()
    x = torch.rand(400, 30) * 0.2 + 0.4
    with torch.no_grad():
        logits = model(x)
    return model, x, logits, logits.argmax(1), layer.weight.detach()


def _exact_remainder(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The smallest margin z_y − max_j z_j any point of the L2 ball reaches on a linear model (the box not
    binding), min_j (z_y − z_j) − eps·‖w_y − w_j‖₂, over the clean margin."""
    gaps = logits.gather(1, y[:, None]) - logits
    reachable = gaps - eps * (weight[y][:, None, :] - weight[None]).norm(dim=2)
    reachable[torch.arange(len(y)), y] = float("inf")
    return reachable.min(1).values / gaps.scatter(1, y[:, None], float("inf")).min(1).values


def test_adaptive_is_a_named_procedure_suite_and_not_the_default():
    assert "adaptive" in SUITES and procedure_of("adaptive") is not None and procedure_of("standard") is None
    import inspect

    assert inspect.signature(evaluate).parameters["suite"].default == "standard"


def test_a_one_shot_stream_is_refused_up_front_and_standard_streams_it(honest, data):
    x, y = data

    def batches():
        yield from ((x[i:i + 16], y[i:i + 16]) for i in range(0, N, 16))

    with pytest.raises(InputError, match="one-shot iterator.*suite='standard'"):
        evaluate(honest, batches(), Linf(EPS), "adaptive")
    assert evaluate(honest, batches(), Linf(EPS), ["apgd-ce"], batch_size=16).n_samples == N


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_ranking_is_the_exact_boundary_distance_on_a_linear_model(norm):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 6)).eval()
    x, y = torch.rand(8, 20) * 0.2 + 0.4, torch.randint(0, 6, (8,))
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    targets = torch.stack([torch.tensor([c for c in range(6) if c != int(label)]) for label in y])
    found = linearised_distances(model, x, y, targets, norm)
    dual = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}[norm]
    for i in range(8):
        for j, t in enumerate(targets[i].tolist()):
            w = weight[t] - weight[y[i]]
            gap = float(x[i] @ weight[y[i]] + bias[y[i]] - x[i] @ weight[t] - bias[t])
            closed = gap / float(w.norm(p=dual))  # the distance in the threat norm to the hyperplane z_t = z_y
            assert abs(float(found[i, j]) - closed) < 1e-4 * max(1.0, abs(closed))
    threat = {"linf": Linf(0.5), "l2": L2(0.5), "l1": None}[norm]
    if threat is not None:  # APGDT's first target is the nearest boundary
        attack = APGDT(model, threat, ranking="linearised", n_target_classes=1)
        with torch.no_grad():
            order = attack.target_order(x, y, model(x))
        nearest = targets.gather(1, found.argmin(1, keepdim=True)).squeeze(1)
        assert torch.equal(order[:, 0], nearest)


def test_honest_model_no_evidence_no_escalation_points_valid_model_untouched(honest, data):
    x, y = data
    before = {k: v.clone() for k, v in honest.state_dict().items()}
    honest.train()
    report = evaluate(honest, (x, y), Linf(EPS), "adaptive", batch_size=N, return_adversarial=True)
    assert honest.training and all(torch.equal(before[k], v) for k, v in honest.state_dict().items())
    assert all(p.requires_grad for p in honest.parameters())
    assert {"label": "fab-t-core", "reason": "runs only in the l2, l1 norm (the suite's choice)"} in report.skipped
    verdict = ("close_call", "near_boundary", "probe_progress")  # about the verdict, not the gradients
    masking = {k: v for k, v in report.evidence.items() if k not in verdict}
    assert not any(v["samples"] for v in masking.values()), report.evidence
    # what ran, ran on near misses only
    for escalation in report.escalations:
        if escalation["ran"]:
            assert set(escalation["called_for_by"]) & set(verdict) and not escalation["model_level"]
            assert escalation["samples"] <= sum(report.evidence[k]["samples"] for k in verdict)
        else:
            assert escalation["reason"].startswith(("not run", "not needed"))
    assert report.x_adv is not None and bool(Linf(EPS).contains(report.x_adv, x, tol=1e-6).all())
    assert float(report.x_adv.min()) >= 0 and float(report.x_adv.max()) <= 1
    # provenance: every sample has a stage or "robust after ..."; the numbers add up
    assert len(report.provenance) == N
    robust = [p for p in report.provenance if p.startswith("robust after")]
    assert len(robust) == int(report.robust.sum()) and 0 < len(robust) < N
    assert "apgd-t-ranked" in robust[0] and report.attack_budget["evidence"]["gradients"] > 0
    data_out = json.loads(report.to_json())
    assert data_out["escalations"] and data_out["samples"]["stage"] == report.provenance
    assert type(report).from_json(report.to_json()).escalations == report.escalations
    assert report.robust_accuracy <= evaluate(honest, (x, y), Linf(EPS), "quick", batch_size=N).robust_accuracy


def test_close_calls_are_exactly_the_near_misses_of_a_linear_model(monkeypatch):
    """On a linear model the smallest margin z_y − max_j z_j over an L2 ball has a closed form,
    min_j (z_y − z_j) − eps·‖w_y − w_j‖₂ (the box does not bind here). A sample is a close call when the core's best
    point leaves less than ``close_call`` of its clean margin: the found margin is never below the exact one, so no
    sample whose exact remainder is above the fraction may be flagged, and the core (APGD on every target, 10
    classes → CE + the 3 nearest) must reach those far below it."""
    model, x, logits, y, weight = _linear_problem(3)
    eps = 0.3  # the optimal step moves no pixel by more than 0.45·eps: it stays inside [0, 1]
    remainder = _exact_remainder(logits, y, weight, eps)  # exact: the best any attack can do, as a fraction
    fraction = 0.2
    near, far = (remainder > 0) & (remainder < fraction / 2), remainder > fraction
    keep = near | far
    assert int(near.sum()) >= 20 and int(far.sum()) >= 20  # the test has both kinds
    settings = dict(PROCEDURES["adaptive"], close_call=fraction, near_distance=0.0)  # the margin's call alone
    monkeypatch.setitem(PROCEDURES, "adaptive", settings)
    monkeypatch.setitem(SUITES, "adaptive", _cheaper_square(probe=50, full=100))
    report = evaluate(model, (x[keep], y[keep]), L2(eps), "adaptive", batch_size=int(keep.sum()))
    assert report.robust_accuracy == 1.0  # no attack can cross: every kept sample has a positive exact margin
    assert "fab-t-core" in report.suite and report.attack_budget["fab-t-core"]["gradients"] > 0  # L2: in the core
    assert report.evidence["close_call"]["samples"] == int(near.sum())
    assert not report.evidence["close_call"]["model_level"]  # about verdicts, never the model's gradients
    fab = _escalation(report, "fab-t")
    assert fab["ran"] and fab["called_for_by"]["close_call"] == int(near.sum()) and fab["broke"] == 0


def test_near_boundary_flags_exactly_the_samples_whose_boundary_is_near_on_a_linear_model(monkeypatch):
    """FAB-T's core stage measures how far the boundary is: on a linear model the L2 distance to the boundary with
    class t is (z_y − z_t) / ‖w_y − w_t‖₂, and FAB's projection onto the linearised boundary is exact, so the
    samples flagged are those whose nearest boundary among FAB-T's 2 targets lies within ``near_distance`` x eps —
    and no other (a sample further out has no adversarial point that close)."""
    model, x, logits, y, weight = _linear_problem(4)
    gaps = logits.gather(1, y[:, None]) - logits
    distance = gaps / (weight[y][:, None, :] - weight[None]).norm(dim=2).clamp_min(1e-12)
    distance[torch.arange(len(y)), y] = float("inf")
    top2 = logits.scatter(1, y[:, None], -float("inf")).topk(2, dim=1).indices  # FAB-T's targets: likeliest first
    nearest = distance.gather(1, top2).min(1).values
    eps, factor = 0.45, 1.3
    near = (nearest > eps * 1.1) & (nearest < factor * eps / 1.1)
    far = (nearest > factor * eps * 1.1) & (distance.min(1).values > eps)  # no attack can cross within eps
    keep = near | far
    assert int(near.sum()) >= 10 and int(far.sum()) >= 10  # the test has both kinds
    settings = dict(PROCEDURES["adaptive"], close_call=0.0, near_distance=factor, probe_progress=0.0)
    monkeypatch.setitem(PROCEDURES, "adaptive", settings)
    monkeypatch.setitem(SUITES, "adaptive", _cheaper_square(probe=50, full=100))
    report = evaluate(model, (x[keep], y[keep]), L2(eps), "adaptive", batch_size=int(keep.sum()))
    assert report.robust_accuracy == 1.0
    assert report.evidence["near_boundary"]["samples"] == int(near.sum())
    assert not report.evidence["near_boundary"]["model_level"]
    flagged = [i for i, p in enumerate(report.provenance) if p.endswith("fab-t")]
    assert flagged == near[keep].nonzero().squeeze(1).tolist()  # FAB-T's escalation ran on exactly those


def test_probe_progress_fires_where_random_search_gets_far_and_is_quiet_where_it_cannot(monkeypatch):
    """The probe took a sample's margin below ``probe_progress`` of its clean margin: on a linear model the smallest
    margin reachable in the ball is exact, so a sample whose exact remainder is above the fraction can never be
    flagged, and one whose remainder is far below it, but that the white-box core walks away from (its gradients
    reversed), is taken far by random search."""
    monkeypatch.setitem(SUITES, "adaptive", _cheaper_square(probe=200, full=100))
    linear, x, logits, y, weight = _linear_problem(5)
    fraction = 0.6
    monkeypatch.setitem(PROCEDURES, "adaptive", dict(PROCEDURES["adaptive"], probe_progress=fraction))
    keep = _exact_remainder(logits, y, weight, 0.02) > fraction * 1.1  # no point in the ball takes these below it
    inside = _exact_remainder(logits, y, weight, 0.05)
    near = (inside > 0.05) & (inside < 0.3)  # no point breaks these, many go below the fraction
    assert int(keep.sum()) >= 40 and int(near.sum()) >= 40
    far = evaluate(linear, (x[keep], y[keep]), L2(0.02), "adaptive", batch_size=400)
    assert far.robust_accuracy == 1.0
    checked = far.evidence["probe_progress"]["checked"]
    assert checked == int(keep.sum()) and far.evidence["probe_progress"]["samples"] == 0
    misled = evaluate(Reversed(linear).eval(), (x[near], y[near]), L2(0.05), "adaptive", batch_size=400)
    assert misled.robust_accuracy == 1.0
    progress = misled.evidence["probe_progress"]
    assert progress["samples"] > 0 and not progress["model_level"]  # a per-sample call
    assert _escalation(misled, "square")["called_for_by"]["probe_progress"] == progress["samples"]
    # the registered settings hold it to L2 (in L∞ a short Square takes half of all survivors that far)
    monkeypatch.setitem(PROCEDURES, "adaptive", dict(PROCEDURES["adaptive"], probe_progress={"l2": fraction}))
    in_linf = evaluate(Reversed(linear).eval(), (x[near], y[near]), Linf(0.02), "adaptive", batch_size=400)
    assert in_linf.evidence["probe_progress"]["checked"] > 0 and in_linf.evidence["probe_progress"]["samples"] == 0


@pytest.mark.parametrize("planted, indicator, escalation", [
    (Scaled, "zero_gradient", "fab-t"),
    (Quantised, "zero_margin_gradient", "square"),
    (Noisy, "random", "apgd-ce-eot"),
    (Reversed, "loss_flat", "fab-t"),
    (Jagged, "shattered", "square"),
])
def test_each_piece_of_evidence_fires_on_its_planted_model(honest, data, planted, indicator, escalation, monkeypatch):
    x, y = data[0][:16], data[1][:16]
    torch.manual_seed(0)
    model = planted(honest).eval()
    # what runs is under test, not Square's budget
    monkeypatch.setitem(SUITES, "adaptive", _cheaper_square(probe=100, full=500))
    suite = [dict(s) for s in SUITES["adaptive"]]
    report = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=16)
    assert _evidence(report, indicator)["model_level"], report.evidence
    ran = _escalation(report, escalation)
    assert ran["ran"] and indicator in ran["model_level"] and ran["samples"] > 0
    assert suite == SUITES["adaptive"]  # the registry is not modified by a run
    if planted is Quantised:
        assert "BPDA" in _escalation(report, "bpda")["reason"]


def test_escalation_reaches_the_standard_outcome_on_a_masked_model(honest, data):
    """Logits × 10⁴: APGD-CE sees no gradient; the evidence sends the rest of standard's attacks after it."""
    x, y = data[0][:24], data[1][:24]
    model = Scaled(honest).eval()
    adaptive = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=24)
    standard = evaluate(model, (x, y), Linf(EPS), "standard", batch_size=24)
    unescalated = evaluate(model, (x, y), Linf(EPS), ["apgd-ce"], batch_size=24)
    assert adaptive.robust_accuracy < unescalated.robust_accuracy  # the masked model fools APGD-CE alone
    assert torch.equal(adaptive.robust, standard.robust)


def test_same_per_sample_results_in_one_block_or_many_and_after_resume(honest, data, tmp_path, monkeypatch):
    x, y = data
    model = Quantised(honest).eval()  # evidence fires: the escalation pass runs too
    # Square's budget does not matter here: keep it CPU-cheap
    monkeypatch.setitem(SUITES, "adaptive", _cheaper_square(probe=100, full=300))
    one = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=N)
    many = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=16)
    white_box = [i for i, p in enumerate(one.provenance) if "square" not in p]
    assert white_box, one.provenance
    for i in white_box:  # Square's windows are drawn per block (see adaptive.py); everything else per sample
        assert one.provenance[i] == many.provenance[i]
    probed = ("black_box", "probe_progress")  # the probe is Square: seeded per block
    assert one.evidence == many.evidence or {k: v["samples"] for k, v in one.evidence.items() if k not in probed} \
        == {k: v["samples"] for k, v in many.evidence.items() if k not in probed}

    journal = tmp_path / "journal.jsonl"
    full = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=16, journal=journal)
    lines = journal.read_text().splitlines()
    assert [json.loads(line).get("phase") for line in lines[1:]] == [1, 1, 1, 2, 2, 2]
    journal.write_text("\n".join(lines[:3]) + "\n")  # killed during the first pass, after two blocks
    resumed = evaluate(model, (x, y), Linf(EPS), "adaptive", batch_size=16, journal=journal, resume=True)
    assert resumed.provenance == full.provenance and torch.equal(resumed.broken_by, full.broken_by)
    assert resumed.escalations == full.escalations


TORCHRUN = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    torch.set_num_threads(1)
    from gradguard import Linf, evaluate
    from gradguard.data import load_dataset
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
""") + DIGITS_MLP_SOURCE + textwrap.dedent("""
    class Quantised(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
        def forward(self, x):
            return self.model(torch.round(x * 8) / 8)
    report = evaluate(Quantised(model).eval(), (d.x_test[:40], d.y_test[:40]), Linf(0.1), "adaptive",
                      batch_size=8, seed=3)
    out = report.to_dict()
    for key in ("elapsed_s", "attack_time_s", "world_size", "attacks"):
        out.pop(key)
    with open(os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
        json.dump(out, handle)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


def test_two_processes_give_the_per_sample_results_of_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN)
    results = {}
    for processes in (1, 2):
        out = tmp_path / str(processes)
        out.mkdir()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={processes}", str(script), str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        results[processes] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    one = results[1][0]
    assert any(e["ran"] for e in one["escalations"])  # the second pass is part of what is compared
    for rank in results[2]:
        assert rank == one


def test_cli_prints_and_reports_the_evidence_and_escalations(tmp_path, capsys):
    from gradguard.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--train-samples", "400", "--samples", "50",
                 "--eps", "0.1", "--lr", "0.01", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--suite", "adaptive", "--samples", "32"]) == 0
    out = capsys.readouterr().out
    for fragment in ("apgd-t-ranked", "evidence", "whole model", "escalation", "not run", "bpda", "seconds"):
        assert fragment in out, out
    robustness = json.loads((run / "robustness.json").read_text())
    assert len(robustness["samples"]["stage"]) == 32 and len(robustness["escalations"]) == 6
    assert main(["report", str(run)]) == 0
    html = next(run.glob("*.html")).read_text()
    assert "Evidence and escalations" in html and "apgd-t-rest" in html


class Flaky(nn.Module):
    """Each pass, each sample's logits are rotated by one class with probability 0.2: a randomised model whose single
    passes are wrong by luck (a success that a majority of passes does not confirm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        z = self.model(x)
        return torch.where((torch.rand(x.shape[0]) < 0.2)[:, None], z.roll(1, dims=1), z)


def test_a_randomised_model_is_judged_by_a_majority_of_passes(honest, data):
    """At eps 1e-4 nothing is really breakable; judged by one pass, a fifth of the samples would fall by luck. The
    suite sees the randomness in its first passes and judges every stage by a majority of 11 (P(≥ 6 of 11 lucky
    flips) ≈ 1 %)."""
    x, y = data
    torch.manual_seed(0)
    report = evaluate(Flaky(honest).eval(), (x, y), Linf(1e-4), "adaptive", batch_size=N)
    correct = int(report.clean_correct.sum())
    broken = correct - int(report.robust.sum())
    assert correct >= N // 2 and broken <= 0.08 * correct, (correct, broken, report.provenance)
    assert report.evidence["random"]["model_level"]


def test_a_randomised_model_is_attacked_to_the_end_of_each_stage(honest, data, monkeypatch):
    """One pass that misclassifies a noisy model's point says little about a majority; so on a randomised model
    no stage stops at a sample's first success — it keeps the highest-loss point it finds — and on an honest model
    every stage stops as usual."""
    from gradguard.evaluation.suites import AttackSpec

    built: list[tuple[str, bool]] = []
    build = AttackSpec.build

    def spy(self, model, threat, seed, **overrides):
        attack = build(self, model, threat, seed, **overrides)
        built.append((self.label, attack.early_stop))
        return attack

    monkeypatch.setattr(AttackSpec, "build", spy)
    short = {"steps": 5, "eot_samples": 2}  # what is built is under test, not the budgets
    monkeypatch.setitem(SUITES, "adaptive", [{**spec, **{k: v for k, v in short.items() if k in spec}}
                                             for spec in _cheaper_square(probe=50, full=100)])
    x, y = data[0][:16], data[1][:16]
    torch.manual_seed(0)
    evaluate(Noisy(honest).eval(), (x, y), Linf(EPS), "adaptive", batch_size=16)
    assert {"apgd-ce", "apgd-ce-eot"} <= {label for label, _ in built} and not any(stop for _, stop in built)
    built.clear()
    evaluate(honest, (x, y), Linf(EPS), "adaptive", batch_size=16)
    assert built and all(stop for _, stop in built)
