"""The "adaptive" suite: a cheap core for every sample, and the expensive attacks only where evidence calls for them.

AutoAttack's ``standard`` spends about three quarters of its passes on FAB-T and a 5000-query Square, which on
models with honest gradients almost never change the verdict, and on models that hide their gradients are what
finds the truth. This procedure spends them where evidence measured along the way says they are needed:

1. **Core** (every sample still robust): APGD-CE (100 steps); then targeted APGD (targeted DLR, 100 steps) against
   the 3 wrong classes nearest by *linearised distance* (z_y − z_t)/‖∇(z_t − z_y)‖_* (MALT's ranking, one gradient
   per candidate), in rank order, a sample leaving as soon as it falls; in L2 and L1, FAB-T (100 steps) on the 2
   likeliest wrong classes — a minimum-norm search breaks samples there that targeted APGD leaves, and measures how
   far the boundary is; then a 500-query Square probe on the samples still robust (``probe_fraction`` of them,
   chosen by a hash of the seed and the sample's index: all of them in L2, a quarter in L∞).
2. **Evidence** (``evidence.py``), one bit per sample: randomness, zero CE / margin gradients, shattered gradients,
   APGD-CE's loss not rising, unstable or unreachable best points, the black-box probe beating the white-box
   attacks — and three that are not about masking, per-sample calls only: a *close call*, a sample the white-box
   core left with less than ``close_call`` (5 %) of its clean logit margin, where the other targets, FAB-T or
   Square are likeliest to change the verdict; *near boundary*, a sample FAB-T's core found an adversarial point
   for within ``near_distance`` (1.25) x eps, for FAB-T's other targets; and *probe progress* (L2), a sample the
   probe took below ``probe_progress`` (60 %) of its clean margin and within ``probe_rival`` (2) x the white-box
   core's margin without breaking it, which a full Square may finish (on a TRADES model in L2, the samples only a
   5 000-query Square breaks). Each masking indicator also gets a
   model-level verdict: its fraction over the whole evaluation against a threshold (the masking checklist's).
3. **Escalation** (the rest of ``SUITES["adaptive"]``): the remaining targets, FAB-T, Square with 5000 queries,
   the "rand" suite's EOT attacks (and a pointer to BPDA) run on the samples whose own evidence calls for them —
   and on every sample still robust when the model-level verdict does. The escalations run in a second pass over
   the data after every block has its core and evidence (so a model-level verdict does not depend on how the data
   is cut into blocks); the journal records both passes, so an interrupted run resumes in either.

A randomised model (two identical passes over a block's correctly classified samples disagree somewhere) has every
stage's successes judged by the majority of ``RANDOM_VOTES`` passes, as the "rand" suite judges them: one lucky
pass does not take a sample out of the cascade before the EOT escalations can attack it. Its stages also run
without early stop: the first point one noisy pass misclassifies is often one a majority does not, so each stage
keeps working to its last step and offers the highest-loss point it found.

Randomness: APGD random starts are drawn per sample (``gradguard.rng.per_sample_generators`` keyed by the seed, the
stage and the sample's global index), so the white-box stages and the evidence give a sample the same outcome in
one block or many and on any number of processes. Square (the probe and the escalation) moves one window per
iteration for its whole batch, so, as in every suite, its draws are seeded per block: with another ``batch_size`` a
sample that only Square breaks may come out differently (with the same ``batch_size``, torchrun gives the same).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import AttackResult, voted_logits
from ..attacks.losses import margin
from ..errors import InputError
from ..rng import per_sample_generators, sample_seed
from ..threat import ThreatModel
from . import evidence as ev
from .cascade import NOT_BROKEN, BlockOutcome, Cascade
from .distributed import Shard, batch_seed
from .journal import JournalWriter
from .results import RobustnessReport
from .stream import Block, BlockSource, release_freed_memory
from .suites import AttackSpec, for_norm

RANDOM_VOTES = 11  # the "rand" suite's success votes: the majority of 11 passes decides on a randomised model
PROBE_STREAM = 7919  # the "epoch" of the probe subset's per-sample hash: independent of every attack's draws


@dataclass
class _Stage:
    """What one stage did on the rows it attacked."""

    index: Tensor
    found: AttackResult
    candidate: Tensor
    logits: Tensor
    success: Tensor
    start_objective: Tensor | None
    min_distance: Tensor | None  # a minimum-norm attack's (FAB's) smallest adversarial perturbation, any size


class AdaptiveCascade(Cascade):
    """Runs the adaptive procedure on one block (``run_block``: core + evidence) and, once every block has its
    evidence, its escalations (``escalate``)."""

    def __init__(self, model: nn.Module, specs: list[AttackSpec], seed: int | None, batch_size: int,
                 settings: dict, norm: str) -> None:
        super().__init__(model, specs, seed)
        self.batch_size = batch_size
        self.core = int(settings["core"])  # the first `core` specs run on every sample; the last of them is the probe
        self.probe_fraction = _for_norm(settings, "probe_fraction", norm, 0.25)
        self.close_call = _for_norm(settings, "close_call", norm)
        self.near_distance = _for_norm(settings, "near_distance", norm)
        self.probe_progress = _for_norm(settings, "probe_progress", norm)
        self.probe_rival = _for_norm(settings, "probe_rival", norm, float("inf"))
        self.flags: dict[str, dict] = {}

    # -- pass 1: the core and the evidence ------------------------------------------------------------
    def run_block(self, block: Block, threat: ThreatModel, *, keep_adversarial: bool) -> BlockOutcome:
        x, y = block.x.to(self.device), block.y.to(self.device)
        clean_logits = self.clean_logits(x, y)
        clean_pred = clean_logits.argmax(1)
        state = _State.start(x, y, clean_pred, keep_adversarial)
        correct = clean_pred == y
        # A randomised model: one lucky pass is no success, so every stage judges by a majority of passes
        if bool(correct.any()) and bool(ev.randomised(self.model, x[correct], self.batch_size).any()):
            state.votes = RANDOM_VOTES
        state.add_budget("evidence", 0, 2 * int(correct.sum()))
        positions = block.index * self.batch_size + torch.arange(x.shape[0], device=x.device)
        evidence = torch.zeros_like(y)
        best_margin = torch.full(y.shape, float("inf"), device=x.device)
        clean_margin = margin(clean_logits, y, True)
        for k in range(self.core):
            rows = state.robust.clone()
            if k == self.core - 1:  # the black-box probe: a random subset of the samples still robust
                evidence |= ev.close_call(best_margin, clean_margin, self.close_call) * state.robust
                rows &= self._probed(positions)
                evidence[rows] |= ev.PROBED_BIT
            stage = self._stage(k, state, rows, threat, block.index, positions)
            if k == 0:
                self._evidence(state, x, y, threat, stage, evidence)
            if stage is None:
                continue
            if k < self.core - 1:  # a white-box stage: do its best points reproduce, and how close did they come?
                survived = ~stage.success
                kept = stage.index[survived]
                evidence[kept] |= ev.unstable_best(
                    stage.found.logits[survived], stage.found.x_adv[survived], stage.logits[survived],
                    stage.candidate[survived])
                best_margin[kept] = torch.minimum(best_margin[kept], margin(stage.logits[survived], y[kept], True))
                if stage.min_distance is not None:  # a minimum-norm search: how far was its nearest point?
                    evidence[kept] |= ev.near_boundary(stage.min_distance[survived], threat.eps,
                                                       self.near_distance)
            else:  # the probe: a sample it breaks is one every white-box stage left; one it took far, nearly
                evidence[stage.index[stage.success]] |= ev.bits("black_box")
                survived = ~stage.success
                kept = stage.index[survived]
                evidence[kept] |= ev.probe_progress(margin(stage.logits[survived], y[kept], True),
                                                    clean_margin[kept], best_margin[kept], self.probe_progress,
                                                    self.probe_rival)
        return state.outcome(block.index, evidence, phase=1)

    def _evidence(self, state: "_State", x: Tensor, y: Tensor, threat: ThreatModel, stage: _Stage | None,
                  evidence: Tensor) -> None:
        """The indicators on the samples APGD-CE left robust (the ones the rest of the suite is about)."""
        started = time.perf_counter()
        checked = state.robust.clone()
        if stage is not None and stage.start_objective is not None:
            survived = ~stage.success
            evidence[stage.index[survived]] |= ev.loss_flat(stage.start_objective[survived],
                                                            stage.found.loss[survived])
        rows = checked.nonzero().squeeze(1)
        if rows.numel() and threat.eps > 0:
            found, grads = ev.at_clean_point(self.model, x[rows], y[rows], threat, self.batch_size)
            evidence[rows] |= found | ev.CHECKED_BIT
            state.add_budget("evidence", grads * rows.numel(), 4 * rows.numel())
        # The checklist's order of causes: randomness, then dead gradients, explain a flat loss and a failed
        # finite-difference test; those two count only where neither is seen (they call for other escalations).
        explained = (evidence & ev.bits("random", "zero_gradient", "zero_margin_gradient")) != 0
        evidence[explained] &= ~ev.bits("loss_flat", "shattered")
        # zero_gradient is the saturated softmax (margin gradients live); with the margin's gradient dead too it is
        # a non-differentiable layer, for which margin-based attacks are no help (the checklist's two kinds).
        evidence[(evidence & ev.bits("zero_margin_gradient")) != 0] &= ~ev.bits("zero_gradient")
        state.times["evidence"] = state.times.get("evidence", 0.0) + time.perf_counter() - started

    def _probed(self, positions: Tensor) -> Tensor:
        """The probe's random subset: a hash of (seed, sample index), so it does not depend on the blocks."""
        seed = 0 if self.seed is None else int(self.seed)
        chosen = [sample_seed(seed, PROBE_STREAM, int(i)) % 10_000 < self.probe_fraction * 10_000
                  for i in positions.tolist()]
        return torch.tensor(chosen, dtype=torch.bool, device=positions.device)

    def _stage(self, k: int, state: "_State", rows: Tensor, threat: ThreatModel, block_index: int,
               positions: Tensor) -> _Stage | None:
        """Attack ``rows`` with stage ``k``; the broken ones leave the cascade. None when nothing was attacked."""
        spec = self.specs[k]
        if threat.eps > 0 and not spec.supports(threat):
            return None
        started = time.perf_counter()
        index = rows.nonzero().squeeze(1)
        result = None
        if threat.eps > 0 and index.numel():
            xb, yb = state.x[index], state.y[index]
            seed: int | None = None
            draws: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if self.seed is not None and spec.name == "square":  # one window per batch: seeded per block
                seed = batch_seed(self.seed, k, block_index)
            elif self.seed is not None:  # random starts drawn per sample: the same in any block
                draws = per_sample_generators(int(self.seed), k, positions[index])
            # a randomised model: no stop at a lucky pass; the highest-loss point found goes on
            attack = spec.build(self.model, threat, seed, **({"early_stop": False} if state.votes > 1 else {}))
            with draws:
                found = attack.run(xb, yb)
            state.add_budget(spec.label, found.n_grad, found.n_forward)
            candidate = threat.project(found.x_adv.detach(), xb)
            votes = max(getattr(attack, "success_votes", 1), state.votes)
            success, logits = voted_logits(self.model, candidate, yb, votes, lambda z, t: z.argmax(1) != t)
            state.stages[index] |= 1 << k
            hit = index[success]
            state.broken_by[hit], state.predictions_adv[hit], state.robust[hit] = k, logits.argmax(1)[success], False
            if state.x_adv is not None:
                state.x_adv[hit] = candidate[success].to(state.x_adv.dtype)
            start = getattr(attack, "start_objective", None) if k == 0 else None
            distance = getattr(attack, "min_distance", None)
            result = _Stage(index, found, candidate, logits, success, _rows_of(start, index), _rows_of(distance, index))
        state.times[spec.label] = state.times.get(spec.label, 0.0) + time.perf_counter() - started
        state.survivors[spec.label] = int(state.robust.sum())
        return result

    # -- pass 2: the escalations -------------------------------------------------------------------
    def escalations(self) -> list[tuple[int, AttackSpec]]:
        return list(enumerate(self.specs))[self.core:]

    def triggers(self, label: str) -> tuple[int, bool]:
        """(evidence bits that call for escalation ``label`` on a sample, whether the model-level verdict calls
        for it on every sample still robust)."""
        mask = ev.calls_for(label)
        whole = any(v["model_level"] and label in v["calls_for"] for v in self.flags.values())
        return mask, whole

    def _needs(self, outcome: BlockOutcome, threat: ThreatModel) -> bool:
        robust = (outcome.clean_pred == outcome.labels) & (outcome.broken_by == NOT_BROKEN)
        if threat.eps == 0 or not bool(robust.any()):
            return False
        for _, spec in self.escalations():
            if not spec.supports(threat):
                continue
            mask, whole = self.triggers(spec.label)
            assert outcome.evidence is not None
            if whole or bool((robust & ((outcome.evidence & mask) != 0)).any()):
                return True
        return False

    def escalate(self, source: BlockSource, outcomes: list[BlockOutcome], threat: ThreatModel, shard: Shard,
                 writer: JournalWriter | None, keep_adversarial: bool) -> list[BlockOutcome]:
        """The second pass: decide the model-level verdicts from every block's evidence, then escalate the blocks
        that need it (each rank its own blocks), and return every block's final outcome."""
        evidence = torch.cat([o.evidence for o in outcomes if o.evidence is not None]) if outcomes else None
        self.flags = ev.model_level(evidence) if evidence is not None else {}
        by_index = {o.index: o for o in outcomes}
        need = sorted(o.index for o in outcomes if o.phase < 2 and self._needs(o, threat))
        if not need:
            return outcomes
        mine = {i for i in need if shard.owns(i)}
        updated: list[BlockOutcome] = []
        for index, read in source.blocks():
            if index not in mine:
                continue
            block = read()
            outcome = self.escalate_block(block, threat, by_index[index], keep_adversarial)
            updated.append(outcome)
            mine.discard(index)
            if writer is not None:
                writer.append(outcome.to_record())
            release_freed_memory()
        if mine:
            raise InputError("data: the adaptive suite reads the data a second time to run its escalations, but "
                             f"blocks {sorted(mine)[:5]} did not come again; pass tensors, a Dataset or a DataLoader "
                             "(not a one-shot generator)")
        for outcome in shard.gather(updated):
            by_index[outcome.index] = outcome
        return [by_index[i] for i in sorted(by_index)]

    def escalate_block(self, block: Block, threat: ThreatModel, outcome: BlockOutcome,
                       keep_adversarial: bool) -> BlockOutcome:
        x, y = block.x.to(self.device), block.y.to(self.device)
        state = _State.resume(x, y, outcome, self.device, keep_adversarial)
        assert outcome.evidence is not None
        evidence = outcome.evidence.to(self.device)
        if bool(((evidence & ev.bits("random")) != 0).any()):
            state.votes = RANDOM_VOTES
        positions = block.index * self.batch_size + torch.arange(x.shape[0], device=x.device)
        for k, spec in self.escalations():
            mask, whole = self.triggers(spec.label)
            rows = state.robust & (torch.ones_like(state.robust) if whole else (evidence & mask) != 0)
            self._stage(k, state, rows, threat, block.index, positions)
        return state.outcome(block.index, evidence, phase=2)

    # -- the report --------------------------------------------------------------------------------
    def finish(self, report: RobustnessReport, outcomes: list[BlockOutcome], threat: ThreatModel) -> None:
        """Add the evidence, the escalations (ran or not, and why) and each sample's provenance to ``report``."""
        evidence = torch.cat([o.evidence for o in outcomes if o.evidence is not None])
        stages = torch.cat([o.stages for o in outcomes if o.stages is not None])
        self.flags = ev.model_level(evidence)
        report.evidence = self.flags
        report.escalations = [self._escalation(k, spec, evidence, stages, report, threat)
                              for k, spec in self.escalations()] + [self._bpda()]
        labels = [s.label for s in self.specs]
        provenance = []
        for correct, broken, ran in zip(report.clean_correct.tolist(), report.broken_by.tolist(), stages.tolist(),
                                        strict=True):
            if not correct:
                provenance.append("misclassified clean")
            elif broken != NOT_BROKEN:
                provenance.append(labels[broken])
            else:
                provenance.append("robust after " + ", ".join(l for i, l in enumerate(labels) if ran >> i & 1)
                                  if ran else "robust (not attacked)")
        report.provenance = provenance
        for label in ("evidence",):
            seconds = sum(o.time_s.get(label, 0.0) for o in outcomes)
            report.attack_time_s[label] = round(seconds, 3)
            report.attack_budget[label] = {"gradients": sum(o.budget.get(label, (0, 0))[0] for o in outcomes),
                                           "forwards": sum(o.budget.get(label, (0, 0))[1] for o in outcomes)}

    def _escalation(self, k: int, spec: AttackSpec, evidence: Tensor, stages: Tensor, report: RobustnessReport,
                    threat: ThreatModel) -> dict:
        mask, whole = self.triggers(spec.label)
        attacked = ((stages >> k) & 1).bool()
        callers = [i for i in ev.INDICATORS if spec.label in i.calls_for]
        record: dict[str, Any] = {
            "stage": spec.label, "ran": bool(attacked.any()), "samples": int(attacked.sum()),
            "broke": int((report.broken_by == k).sum()),
            "model_level": [i.name for i in callers if self.flags[i.name]["model_level"]],
            "called_for_by": {i.name: int((attacked & ((evidence >> i.bit) & 1).bool()).sum()) for i in callers},
        }
        if threat.eps > 0 and not spec.supports(threat):
            record["reason"] = f"not run: {spec.label} {spec.unsupported(threat)}"
        elif record["ran"]:
            scope = ("every sample still robust (model-level: " + ", ".join(record["model_level"]) + ")"
                     if whole else "the samples whose own evidence called for it")
            record["reason"] = f"ran on {scope}"
        else:
            quiet = "; ".join(f"{i.name} {self.flags[i.name]['samples']}/{self.flags[i.name]['checked']} "
                              + (f"(model-level above {100 * i.threshold:g} %)" if i.threshold < 1 else
                                 "(per sample only)") for i in callers)
            record["reason"] = ("not run: no sample still robust had evidence calling for it (" + quiet + ")"
                                if evidence.numel() else "not run: nothing to attack")
        return record

    def _bpda(self) -> dict:
        fired = self.flags.get("zero_margin_gradient", {})
        needed = bool(fired.get("model_level"))
        return {"stage": ev.BPDA, "ran": False, "samples": 0, "broke": 0,
                "model_level": ["zero_margin_gradient"] if needed else [],
                "called_for_by": {"zero_margin_gradient": int(fired.get("samples", 0))},
                "reason": ev.BPDA_NOTE if needed else
                ("not needed: gradients of the logit margin are live on "
                 f"{fired.get('checked', 0) - fired.get('samples', 0)}/{fired.get('checked', 0)} checked samples")}


def _for_norm(settings: dict, name: str, norm: str, default: float = 0.0) -> float:
    """A setting of the procedure: a number, or a dict of numbers by threat norm (a norm it lacks: ``default``)."""
    return float(for_norm(settings.get(name, default), norm, default))


def _rows_of(value: Any, index: Tensor) -> Tensor | None:
    """A per-row record an attack left (a tensor with one entry per attacked row), or None."""
    return value if isinstance(value, Tensor) and value.shape[0] == index.numel() else None


@dataclass
class _State:
    """One block's running per-sample results."""

    x: Tensor
    y: Tensor
    clean_pred: Tensor
    robust: Tensor
    broken_by: Tensor
    predictions_adv: Tensor
    x_adv: Tensor | None
    stages: Tensor
    times: dict
    survivors: dict
    budget: dict
    votes: int = 1  # passes whose majority judges a success: RANDOM_VOTES on a randomised model

    @classmethod
    def start(cls, x: Tensor, y: Tensor, clean_pred: Tensor, keep_adversarial: bool) -> "_State":
        return cls(x, y, clean_pred, clean_pred == y, torch.full_like(y, NOT_BROKEN), clean_pred.clone(),
                   x.clone() if keep_adversarial else None, torch.zeros_like(y), {}, {}, {})

    @classmethod
    def resume(cls, x: Tensor, y: Tensor, outcome: BlockOutcome, device: torch.device,
               keep_adversarial: bool) -> "_State":
        clean_pred, broken_by = outcome.clean_pred.to(device), outcome.broken_by.to(device)
        assert outcome.stages is not None
        x_adv = None
        if keep_adversarial:
            x_adv = x.clone() if outcome.x_adv is None else outcome.x_adv.to(device)
        return cls(x, y, clean_pred, (clean_pred == y) & (broken_by == NOT_BROKEN), broken_by.clone(),
                   outcome.predictions_adv.to(device).clone(), x_adv, outcome.stages.to(device).clone(),
                   dict(outcome.time_s), dict(outcome.survivors), {k: list(v) for k, v in outcome.budget.items()})

    def add_budget(self, label: str, gradients: int, forwards: int) -> None:
        spent = self.budget.setdefault(label, [0, 0])
        spent[0] += int(gradients)
        spent[1] += int(forwards)

    def outcome(self, index: int, evidence: Tensor, phase: int) -> BlockOutcome:
        return BlockOutcome(index, self.y.cpu(), self.clean_pred.cpu(), self.broken_by.cpu(),
                             self.predictions_adv.cpu(), self.times, self.survivors,
                             None if self.x_adv is None else self.x_adv.cpu(), self.budget,
                             evidence=evidence.cpu(), stages=self.stages.cpu(), phase=phase)
