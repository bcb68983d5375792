"""GradientMonitor's newer findings (nonfinite, learning rate, input scale, unrecorded) and its actions
(on_finding="warn" | "stop" | callable), alone and inside the Trainer."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from gradguard.diagnostics import GradientMonitor, findings_from_records
from gradguard.diagnostics.gradflow import FATAL_KINDS, GradientHealthWarning, TrainingStopped
from gradguard.errors import ConfigError, InputError
from gradguard.models import load_weights
from gradguard.train import Trainer


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model, digits, *, lr: float = 1e-3, optimizer: str = "adam", steps: int = 40, every: int = 2,
          scale: float = 1.0, poison_step: int | None = None, **monitor_kwargs) -> GradientMonitor:
    """A user's plain loop: optimiser hooks count the steps, the loss is handed to step()."""
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    x, y = digits.x_train * scale, digits.y_train
    generator = torch.Generator().manual_seed(0)
    with GradientMonitor(model, every=every, optimizer=opt, **monitor_kwargs) as monitor:
        for step in range(steps):
            batch = torch.randint(0, len(y), (64,), generator=generator)
            inputs = x[batch].clone()
            if step == poison_step:
                inputs[0, 0, 0, 0] = float("inf")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            loss.backward()
            opt.step()
            monitor.step(loss)
    return monitor


def kinds(findings) -> set[str]:
    return {finding.kind for finding in findings}


# ------------------------------------------------------------------------------------------------
# No silent all-clear
# ------------------------------------------------------------------------------------------------
def test_a_monitor_that_recorded_nothing_says_so(digits):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="recorded nothing"):
        with GradientMonitor(model, every=5):  # the new user's first try: no optimizer=, no step()
            for start in range(0, 256, 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(digits.x_train[start:start + 64]),
                                            digits.y_train[start:start + 64]).backward()
                opt.step()
    with pytest.warns(RuntimeWarning, match="recorded nothing"):
        findings = GradientMonitor(model).findings()
    assert [f.kind for f in findings] == ["unrecorded"]
    assert "optimizer=" in findings[0].advice and findings[0].evidence["steps_counted"] == 0
    assert [f.kind for f in findings_from_records([])] == ["unrecorded"]


def test_the_documented_first_example_records_and_finds_a_healthy_run_healthy(digits):
    monitor = train(small_mlp(), digits, lr=1e-3)
    assert monitor.records and monitor.findings() == []
    assert {r["forward_index"] for r in monitor.records if r["step"] == 0} == {0, 1}
    first = next(r for r in monitor.records if r["forward_index"] == 0)
    assert 0 < first["input_rms"] < 1 and first["input_finite"] is True


# ------------------------------------------------------------------------------------------------
# New findings
# ------------------------------------------------------------------------------------------------
def test_an_inf_in_one_batch_is_flagged_nonfinite_with_its_step_even_between_samples(digits):
    monitor = train(small_mlp(), digits, every=4, poison_step=9)  # step 9 is not sampled (0, 4, 8, 12, ...)
    found = [f for f in monitor.findings() if f.kind == "nonfinite"]
    assert len(found) == 1
    evidence = found[0].evidence
    assert evidence["first_step"] == 9 and evidence["loss_nonfinite_step"] == 9
    assert found[0].layer == "3"  # backward reaches the last Linear first; every gradient is NaN from there on
    assert not ({"exploding", "dead", "vanishing"} & kinds(monitor.findings()))  # NaN records do not feed them


def test_an_inf_in_a_sampled_batch_names_the_input():
    model = small_mlp()
    with GradientMonitor(model, every=1) as monitor:
        x = torch.rand(8, 1, 8, 8)
        x[0, 0, 0, 0] = float("inf")
        model(x).sum().backward()
        monitor.step()
    finding = next(f for f in monitor.findings() if f.kind == "nonfinite")
    assert finding.evidence["input_nonfinite_step"] == 0


def test_learning_rate_too_high_and_too_low(digits):
    high = train(small_mlp(), digits, lr=1.0, optimizer="sgd", steps=60)  # noisy loss, no divergence
    found = [f for f in high.findings() if f.kind == "lr_too_high"]
    assert found and found[0].evidence["update_ratio"] > 0.1
    low = train(small_mlp(), digits, lr=1e-9, optimizer="sgd")
    found = [f for f in low.findings() if f.kind == "lr_too_low"]
    assert found and found[0].evidence["update_ratio"] < 1e-6 and found[0].evidence["loss_change"] < 1e-2
    assert "lr_too_low" not in kinds(train(small_mlp(), digits, lr=1e-2, optimizer="sgd").findings())


def test_lr_rules_on_records():
    def records(ratio: float, losses: list[float]) -> list[dict]:
        return [{"step": s, "layer": "a", "index": 0, "weight_norm": 1.0, "update_ratio": ratio, "update_norm": ratio,
                 "grad_norm": 1.0, "numel": 1, "loss": loss} for s, loss in enumerate(losses)]

    assert kinds(findings_from_records(records(1e-7, [2.3] * 8))) == {"lr_too_low"}
    assert kinds(findings_from_records(records(1e-7, [2.3 - 0.1 * s for s in range(8)]))) == set()  # loss moves
    assert kinds(findings_from_records(records(0.5, [2.3] * 8))) == {"lr_too_high"}
    assert kinds(findings_from_records(records(1e-3, [2.3] * 8))) == set()


def test_inputs_left_in_0_255_are_flagged(digits):
    raw = train(small_mlp(), digits, scale=255.0, lr=1e-4)
    found = [f for f in raw.findings() if f.kind == "inputs_not_normalised"]
    assert found and found[0].layer == "1" and found[0].evidence["input_rms"] > 10
    assert "x / 255" in found[0].advice


# ------------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------------
def test_on_finding_is_checked():
    with pytest.raises(ConfigError, match="on_finding"):
        GradientMonitor(small_mlp(), on_finding="shout")
    with pytest.raises(InputError, match="scalar"):
        GradientMonitor(small_mlp()).step(torch.ones(3))


def test_warn_once_per_finding(digits):
    with pytest.warns(GradientHealthWarning) as caught:
        monitor = train(small_mlp(), digits, lr=1.0, optimizer="sgd", steps=60, on_finding="warn")
    messages = [str(w.message) for w in caught if issubclass(w.category, GradientHealthWarning)]
    assert sum("lr_too_high" in m for m in messages) == 1
    assert [a["kind"] for a in monitor.actions].count("lr_too_high") == 1


def test_stop_raises_at_a_fatal_finding_and_a_callable_is_called(digits):
    assert FATAL_KINDS == {"nonfinite", "exploding"}
    with pytest.raises(TrainingStopped, match="nonfinite") as stop:
        train(small_mlp(), digits, every=4, poison_step=9, on_finding="stop")
    assert stop.value.finding.kind == "nonfinite" and stop.value.step == 9  # acted on at once, not at step 12
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a callable replaces the warning
        train(small_mlp(), digits, lr=1.0, optimizer="sgd", steps=60, on_finding=seen.append)
    assert "lr_too_high" in kinds(seen)


def test_stop_names_the_poisoned_step_when_step_counts(digits):
    """Counting with step(loss) and no optimiser hooks (as framework callbacks do), a NaN loss is acted on at its
    own step: the step is not counted yet when its loss is checked."""
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits.x_train[:64].clone(), digits.y_train[:64]
    with pytest.raises(TrainingStopped) as stop, GradientMonitor(model, every=4, on_finding="stop") as monitor:
        for step in range(20):
            inputs = x.clone()
            if step == 9:
                inputs[0, 0, 0, 0] = float("inf")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), y)
            loss.backward()
            opt.step()
            monitor.step(loss)
    assert stop.value.step == 9 and stop.value.finding.evidence["first_step"] == 9
    assert monitor.actions == [{"step": 9, "kind": "nonfinite", "layer": "(loss)", "action": "stop"}]


class Glitch(nn.Module):
    """Identity, except that its ``at``-th training forward returns NaN (a planted numerical fault)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                return x * float("nan")
        return x


def test_trainer_stops_on_a_fatal_finding_records_it_and_keeps_the_last_saved_epoch(digits, tmp_path):
    x, y = digits.x_train[:512], digits.y_train[:512]  # 8 steps an epoch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Glitch(at=11), nn.ReLU(), nn.Linear(32, 10))
    monitor = GradientMonitor(model, every=3, on_finding="stop")
    trainer = Trainer(model, "standard", epochs=4, batch_size=64, lr=1e-2, run_dir=tmp_path / "run", monitor=monitor,
                      progress=False, seed=0, val_attack=None)
    with pytest.warns(UserWarning, match="stopped"):
        history = trainer.fit((x, y), (x[:64], y[:64]))
    assert trainer.stopped is not None and trainer.stopped["finding"]["kind"] == "nonfinite"
    assert len(history) == 1 and trainer.stopped["epoch"] == 2 and trainer.stopped["step"] == 10  # at once
    assert "end of epoch 1 is kept" in trainer.stopped["action"]
    saved = load_weights(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Identity(), nn.ReLU(), nn.Linear(32, 10)),
                         tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in saved.parameters())  # the saved epoch-1 model, not the NaN one
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped" and "nonfinite" in events[-1]["rule"]


# ------------------------------------------------------------------------------------------------
# Not learning: thrown off by a too-large step, then stuck at (or above) chance
# ------------------------------------------------------------------------------------------------
def small_cnn(seed: int = 0) -> nn.Module:
    """Two strided convolutions, global average pooling, a linear head: at SGD lr 2 its gradient spikes and the loss
    then sits above chance (the fault benchmark's CNN, smaller)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train_cnn(digits, optimiser: str, lr: float, steps: int = 60) -> tuple[GradientMonitor, list[str]]:
    model = small_cnn()
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimiser == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    generator, seen = torch.Generator().manual_seed(0), []
    with GradientMonitor(model, every=2, optimizer=opt, on_finding=lambda f: seen.append(f.kind)) as monitor:
        for _ in range(steps):
            batch = torch.randint(0, len(digits.y_train), (64,), generator=generator)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(digits.x_train[batch]), digits.y_train[batch])
            loss.backward()
            opt.step()
            monitor.step(loss)
    return monitor, seen


def test_a_cnn_thrown_off_by_a_too_high_lr_and_stuck_at_chance_is_not_learning(digits):
    monitor, _ = train_cnn(digits, "sgd", lr=2.0)
    found = [f for f in monitor.findings() if f.kind == "not_learning"]
    assert found, [f.kind for f in monitor.findings()]
    evidence = found[0].evidence
    assert evidence["output_width"] == 10 and evidence["chance_loss"] == pytest.approx(2.302585, rel=1e-6)
    assert evidence["loss_recent"] >= max(evidence["loss_start"], evidence["chance_loss"])
    assert evidence["ratio"] >= 1.0 and evidence["grad_growth"] >= 4.0
    assert all(r["output_width"] == 10 for r in monitor.records)
    assert "learning rate" in found[0].advice


def test_a_healthy_cnn_is_never_flagged_as_not_learning(digits):
    monitor, seen = train_cnn(digits, "adam", lr=1e-2)
    assert "not_learning" not in kinds(monitor.findings()) and "not_learning" not in seen  # not even for a while


def test_not_learning_rule_on_records():
    def records(losses: list[float], norms: list[float], width: int | None = 10) -> list[dict]:
        return [{"step": s, "layer": "a", "index": 0, "weight_norm": 1.0, "update_ratio": 1e-3, "update_norm": 1e-3,
                 "grad_norm": norm, "numel": 1, "loss": loss, "output_width": width}
                for s, (loss, norm) in enumerate(zip(losses, norms, strict=True))]

    spike = [1.0, 1.0, 1.0, 50.0, 20.0, 10.0, 5.0, 5.0, 5.0, 5.0]
    flat = [1.0] * 10
    stuck = [2.30, 2.30, 2.30, 4.0, 3.0, 2.5, 2.4, 2.37, 2.36, 2.36]  # recent 2.37: 3 % above ln 10 and its start
    assert kinds(findings_from_records(records(stuck, spike))) == {"not_learning"}
    # a slow starter: the same loss level with a gradient that never spiked
    assert kinds(findings_from_records(records(stuck, flat))) == set()
    # diverged: 13 % above chance and its start, whatever the gradient did
    diverged = [2.30, 2.30, 2.30, 2.4, 2.5, 2.6, 2.6, 2.6, 2.6, 2.6]
    found = findings_from_records(records(diverged, flat))
    assert kinds(found) == {"not_learning"} and found[0].evidence["ratio"] == pytest.approx(2.6 / 2.302585)
    # a spike the run recovered from: the loss fell below its start
    assert kinds(findings_from_records(records([2.3, 2.3, 2.3, 4.0, 2.0, 1.5, 1.2, 1.1, 1.0, 0.9], spike))) == set()
    # a loss that started above chance (a ViT's init) and fell, though it is still above chance: learning
    assert kinds(findings_from_records(records([2.6, 2.6, 2.6, 3.0, 2.5, 2.45, 2.4, 2.4, 2.4, 2.4], spike))) == set()
    # a fine-tune below chance that diverged past it; without a known width, the start is the bar
    assert kinds(findings_from_records(records([0.3, 0.3, 0.3, 5.0, 3.0, 2.6, 2.5, 2.5, 2.5, 2.5], spike))) \
        == {"not_learning"}
    assert kinds(findings_from_records(records([0.3, 0.3, 0.3, 5.0, 1.0, 0.6, 0.5, 0.5, 0.5, 0.5], spike,
                                               width=None))) == {"not_learning"}
    # the warm-up: fewer than START_SAMPLES + RECENT_SAMPLES losses decide nothing
    assert kinds(findings_from_records(records(stuck[:7], spike[:7]))) == set()
