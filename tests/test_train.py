"""Trainer and methods: every method hardens a model, the objective is exactly a·L + r·‖θ‖², clipping holds,
the catastrophic-overfitting guard rolls back, and a killed run resumes to identical weights."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from typing import Any, cast

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradguard import CheckpointError, ConfigError, Linf
from gradguard.attacks import PGD
from gradguard.models import build_model, load
from gradguard.train import FGSMAT, METHODS, FastFGSM, Trainer, get_method

EPS = 0.2
THREAT = Linf(EPS)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", depth=1, width=64, input_shape=(1, 8, 8))


def pgd_accuracy(model: nn.Module, x, y) -> float:
    return PGD(model.eval(), THREAT, steps=20, seed=1).run(x, y).accuracy


def train(method: str, digits, epochs: int = 3, val=None, **kwargs) -> tuple[nn.Module, Trainer]:
    model = tiny_mlp()
    options: dict[str, Any] = dict(threat=THREAT, epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3, progress=False,
                   val_attack=None)
    options.update(kwargs)
    trainer = Trainer(model, method, **options)
    trainer.fit((digits.x_train, digits.y_train), val)
    return model, trainer


@pytest.fixture(scope="module")
def standard_robust_accuracy(digits):
    model, _ = train("standard", digits)
    return pgd_accuracy(model, digits.x_test, digits.y_test)


@pytest.mark.parametrize("method", ["fgsm", "fgsm-rs", "pgd", "trades"])
def test_each_method_beats_standard_training_under_pgd(method, digits, standard_robust_accuracy):
    options = {"method_kwargs": {"steps": 5}} if method in ("pgd", "trades") else {}
    model, _ = train(method, digits, **options)
    robust = pgd_accuracy(model, digits.x_test, digits.y_test)
    assert standard_robust_accuracy < 0.15
    assert robust > standard_robust_accuracy + 0.12, (method, robust, standard_robust_accuracy)


def test_methods_registry_and_errors():
    assert sorted(METHODS) == ["cure", "fgsm", "fgsm-rs", "gaussian", "gradalign", "input-grad-reg", "mart", "pgd",
                              "standard", "trades"]
    assert get_method("trades", THREAT, beta=3.0).beta == 3.0
    with pytest.raises(ConfigError, match="method"):
        get_method("free-at", THREAT)
    with pytest.raises(ConfigError, match="threat"):
        get_method("pgd", None)
    with pytest.raises(ConfigError, match="invalid options"):
        get_method("pgd", THREAT, beta=1.0)


def test_objective_is_exactly_weighted_loss_plus_l2(digits):
    """One full-batch SGD step (no momentum): reported J and the update match a·L + r·‖θ‖² in closed form,
    with biases excluded from ‖θ‖²."""
    a, r, lr = 0.7, 0.05, 0.1
    x, y = digits.x_train[:200], digits.y_train[:200]
    model = tiny_mlp()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model, "standard", epochs=1, batch_size=200, optimizer="sgd", lr=lr, momentum=0.0,
                      loss_weight=a, l2=r, progress=False)
    history = trainer.fit((x, y))

    reference = tiny_mlp()
    loss = F.cross_entropy(reference(x), y)
    weights = [p for name, p in reference.named_parameters() if not name.endswith("bias")]
    objective = a * loss + r * sum((w * w).sum() for w in weights)
    assert history[0]["train_objective"] == pytest.approx(objective.item(), rel=1e-6)
    assert history[0]["train_loss"] == pytest.approx(loss.item(), rel=1e-6)
    names, params = zip(*reference.named_parameters(), strict=True)
    loss_grads = dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True), strict=True))
    objective.backward()
    trained = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        penalty_grad = 0.0 if name.endswith("bias") else 2 * r * before[name]  # no L2 on biases
        torch.testing.assert_close(p.grad, a * loss_grads[name] + penalty_grad)
        torch.testing.assert_close(trained[name].detach(), before[name] - lr * p.grad, rtol=1e-5, atol=1e-6)


def test_l2_exclude_skips_biases_and_norm_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    names = {id(p): n for n, p in model.named_parameters()}
    default = Trainer(model, "standard", progress=False)
    assert sorted(names[id(p)] for p in default.regularised_parameters()) == ["0.weight", "3.weight"]
    everything = Trainer(model, "standard", l2_exclude=(), progress=False)
    assert len(everything.regularised_parameters()) == len(list(model.parameters()))


class GradientRecorder:
    """A duck-typed monitor: the Trainer calls step() after every optimiser step (gradients still in place)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.max_abs: list[float] = []
        self.norms: list[float] = []

    def step(self) -> None:
        grads = [cast(torch.Tensor, p.grad) for p in self.model.parameters()]  # all set: step() follows backward
        self.max_abs.append(max(float(g.abs().max()) for g in grads))
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


@pytest.mark.parametrize("clip", [{"clip_grad_value": 0.01}, {"clip_grad_norm": 0.05},
                                  {"clip_grad_value": 0.01, "clip_grad_norm": 0.02}])
def test_gradient_clipping_bounds_hold_every_step(digits, tmp_path, clip):
    model = tiny_mlp()
    recorder = GradientRecorder(model)
    Trainer(model, "fgsm", threat=THREAT, epochs=1, batch_size=64, lr=0.05, monitor=recorder, run_dir=tmp_path,
            progress=False, val_attack=None, **clip).fit((digits.x_train[:640], digits.y_train[:640]))
    assert len(recorder.norms) == 10
    if "clip_grad_value" in clip:
        assert max(recorder.max_abs) <= clip["clip_grad_value"] + 1e-9
    if "clip_grad_norm" in clip:
        assert max(recorder.norms) <= clip["clip_grad_norm"] * (1 + 1e-5)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    pre_clip = [s["grad_norm"] for s in steps]
    assert len(pre_clip) == 10 and min(pre_clip) > max(recorder.norms)  # the log holds the pre-clip norm


class ScriptedGuardTrainer(Trainer):
    """Injects the guard's measurements (PGD acc, FGSM acc) so a collapse happens at a known epoch,
    and records the weights the rollback restores."""

    def __init__(self, *args, script, **kwargs):
        super().__init__(*args, **kwargs)
        self.script, self.restored = list(script), []

    def measure_guard_accuracies(self, x, y):
        return self.script.pop(0)

    def _restore_snapshot(self, snapshot):
        super()._restore_snapshot(snapshot)
        self.restored.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_catastrophic_overfitting_guard_rolls_back_and_recovers(digits, tmp_path):
    model = tiny_mlp()
    at_epoch_end = []
    # epoch 1, 2 fine; epoch 3 collapses (PGD 0.01, FGSM 0.9); its re-run and epoch 4 are fine.
    script = [(0.30, 0.35), (0.40, 0.45), (0.01, 0.90), (0.42, 0.47), (0.45, 0.50)]
    trainer = ScriptedGuardTrainer(model, FastFGSM(THREAT), threat=THREAT, epochs=4, batch_size=128, lr=0.05,
                                   run_dir=tmp_path, progress=False, val_attack=None, script=script,
                                   on_epoch_end=lambda m: at_epoch_end.append(
                                       {k: v.clone() for k, v in model.state_dict().items()}))
    with pytest.warns(UserWarning, match="catastrophic_overfitting at epoch 3"):
        history = trainer.fit((digits.x_train[:640], digits.y_train[:640]))
    assert [m["epoch"] for m in history] == [1, 2, 3, 4] and not trainer.script
    assert len(trainer.restored) == 1
    for key, value in trainer.restored[0].items():  # rolled back to exactly the end of epoch 2
        assert torch.equal(value, at_epoch_end[1][key])
    assert not all(torch.equal(at_epoch_end[2][k], at_epoch_end[1][k]) for k in at_epoch_end[1])  # and trained on
    assert trainer.method.step_factor == 1.0 and trainer.lr_scale == 0.5
    assert history[2]["lr"] == pytest.approx(0.025)
    event = json.loads((tmp_path / "events.jsonl").read_text())
    assert event["epoch"] == 3 and "rolled back" in event["action"] and "1.0·eps" in event["action"]


def test_guard_watches_classic_fgsm_training_and_adds_a_random_start(digits):
    method = FGSMAT(THREAT)
    script = [(0.30, 0.35), (0.01, 0.90), (0.32, 0.36)]  # epoch 2 collapses; its re-run is fine
    trainer = ScriptedGuardTrainer(tiny_mlp(), method, threat=THREAT, epochs=2, batch_size=128, lr=0.05,
                                   progress=False, val_attack=None, script=script)
    assert trainer.co_guard  # "auto" covers both single-step methods
    with pytest.warns(UserWarning, match="catastrophic_overfitting at epoch 2"):
        trainer.fit((digits.x_train[:256], digits.y_train[:256]))
    assert method.random_start and len(trainer.restored) == 1 and not trainer.script
    assert "random start" in trainer.events[0]["action"] and trainer.events[0]["method"]["random_start"] is True
    assert method.make_safer() is None  # nothing safer left for FGSM-AT


def test_guard_rules_sudden_and_slow_collapse():
    from gradguard.train import GuardSettings

    rules = GuardSettings()
    assert rules.collapsed(0.70, 0.74, reference=0.68) is None  # healthy: PGD a little below FGSM
    assert "last good" in rules.collapsed(0.15, 0.40, reference=0.60)  # PGD fell below 30 % of the last epoch
    assert "while FGSM" in rules.collapsed(0.01, 0.90, reference=None)  # the classic collapse, first epoch
    assert "exceeds PGD" in rules.collapsed(0.68, 0.86, reference=0.70)  # slow drift: FGSM-only robustness
    assert GuardSettings(max_gap=None).collapsed(0.68, 0.86, reference=0.70) is None


def test_guard_escalates_to_pgd2_then_gives_up():
    method = FastFGSM(THREAT)
    assert "1.0" in method.make_safer() and "PGD-2" in method.make_safer()
    assert method.make_safer() is None and method.pgd_steps == 2


def test_guard_stays_quiet_on_healthy_fast_fgsm(digits):
    _, trainer = train("fgsm-rs", digits, epochs=3)
    assert trainer.co_guard and not trainer.events
    assert all(m["guard"]["pgd_acc"] > 0.05 for m in trainer.history)


def test_run_directory_contents_and_loadable_model(digits, tmp_path):
    model, trainer = train("fgsm", digits, epochs=2, run_dir=tmp_path, val_attack="pgd", val=(digits.x_test, digits.y_test),
                           metadata={"dataset": "digits"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"]["name"] == "fgsm" and config["threat"]["eps"] == EPS and config["seed"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and 0 <= metrics[-1]["val_robust_acc"] <= 1
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["dataset"] == "digits" and sidecar["method"]["name"] == "fgsm" and sidecar["epoch"] == 2
    x = digits.x_test[:16]
    assert torch.equal(load(tmp_path)(x), model.eval()(x))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "epoch-0001.json", "epoch-0001.safetensors", "epoch-0002.json", "epoch-0002.safetensors"]


def test_same_seed_gives_identical_training(digits):
    a, _ = train("fgsm-rs", digits, epochs=1)
    b, _ = train("fgsm-rs", digits, epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_eps_warmup_and_cyclic_schedule(digits, tmp_path):
    train("fgsm", digits, epochs=4, eps_warmup_epochs=2, schedule="cyclic", optimizer="sgd", lr=0.1,
          run_dir=tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    lrs, eps = [s["lr"] for s in steps], [s["eps"] for s in steps]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and 0.3 < peak / len(lrs) < 0.5
    assert lrs[0] < 0.01 and lrs[-1] < 1e-9
    assert all(b >= a for a, b in zip(eps, eps[1:], strict=False)) and eps[0] < 0.01 and eps[-1] == EPS
    assert eps[len(eps) // 2 - 1] == pytest.approx(EPS)  # warm-up done after 2 of 4 epochs


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "pgd"}, "threat"), ({"optimizer": "rmsprop"}, "optimizer"), ({"schedule": "cosine"}, "schedule"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"), ({"l2": -0.1}, "l2"), ({"resume": True}, "resume"),
    ({"l2_exclude": ("weights",)}, "l2_exclude"), ({"monitor": object()}, "monitor"), ({"epochs": 0}, "epochs")])
def test_bad_trainer_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(tiny_mlp(), **kwargs)


def test_out_of_bounds_training_data_is_rejected(digits):
    from gradguard import BoundsError

    with pytest.raises(BoundsError, match="train"):
        Trainer(tiny_mlp(), "fgsm", threat=THREAT, progress=False).fit((digits.x_train * 2, digits.y_train))


def test_existing_run_is_not_overwritten_without_resume(digits, tmp_path):
    train("standard", digits, epochs=1, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="resume=True"):
        train("standard", digits, epochs=1, run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(lr: recorded [0-9.e-]+, given 0\.5\); resume with the "
                       "recorded settings"):
        train("standard", digits, epochs=1, run_dir=tmp_path, resume=True, lr=0.5)


# ------------------------------------------------------------------------------------------------
# Crash safety: kill -9 and resume; crashed saves never read as valid
# ------------------------------------------------------------------------------------------------
RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(2)
    from gradguard import Linf
    from gradguard.data import load_dataset
    from gradguard.models import build_model
    from gradguard.train import Trainer
    run_dir, kill_after = sys.argv[1], int(sys.argv[2])
    d = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", depth=1, width=64, input_shape=(1, 8, 8))
    def on_epoch_end(metrics):
        if metrics["epoch"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer(model, "fgsm-rs", threat=Linf(0.2), epochs=4, batch_size=64, optimizer="adam", lr=3e-3,
            run_dir=run_dir, progress=False, val_attack=None, on_epoch_end=on_epoch_end,
            resume=len(sys.argv) > 3).fit((d.x_train[:640], d.y_train[:640]))
""")


def test_kill_9_then_resume_gives_identical_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    first = subprocess.run([sys.executable, str(script), str(crashed), "2"], capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert len((crashed / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = subprocess.run([sys.executable, str(script), str(crashed), "0", "resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # The uninterrupted reference runs in this process: same code, same seed, same thread count.
    from gradguard.data import load_dataset

    d = load_dataset("digits")
    torch.manual_seed(0)
    reference = build_model("mlp", depth=1, width=64, input_shape=(1, 8, 8))
    Trainer(reference, "fgsm-rs", threat=Linf(0.2), epochs=4, batch_size=64, optimizer="adam", lr=3e-3,
            run_dir=clean, progress=False, val_attack=None).fit((d.x_train[:640], d.y_train[:640]))
    a, b = load(crashed).state_dict(), load(clean).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    metrics_a = (crashed / "metrics.jsonl").read_text().splitlines()
    metrics_b = (clean / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in lines]  # noqa: E731
    assert strip(metrics_a) == strip(metrics_b)
    steps = [json.loads(line)["step"] for line in (crashed / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(40))


def _checkpointed_run(digits, run_dir, epochs):
    return train("fgsm-rs", digits, epochs=epochs, run_dir=run_dir)


def test_truncated_latest_checkpoint_is_skipped_on_resume(digits, tmp_path):
    from gradguard.train import latest_checkpoint, read_checkpoint

    _checkpointed_run(digits, tmp_path, 2)
    newest = tmp_path / "checkpoint" / "epoch-0002.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash mid-write, without rename
    (tmp_path / "checkpoint" / ".epoch-0003.safetensors.abc.tmp").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(newest.with_suffix(".json"))
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        _, state = latest_checkpoint(tmp_path / "checkpoint")
    assert state["epoch"] == 1
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        _, trainer = train("fgsm-rs", digits, epochs=2, run_dir=tmp_path, resume=True)
    assert [m["epoch"] for m in trainer.history] == [1, 2]


def test_truncated_checkpoint_json_raises_checkpoint_error(digits, tmp_path):
    from gradguard.train import read_checkpoint

    _checkpointed_run(digits, tmp_path, 1)
    record = tmp_path / "checkpoint" / "epoch-0001.json"
    record.write_text(record.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(record)


def test_failed_atomic_write_leaves_no_file(tmp_path, monkeypatch):
    from gradguard import io

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(OSError):
        io.atomic_write_bytes(tmp_path / "model.safetensors", b"x" * 100)
    assert list(tmp_path.iterdir()) == []


def test_dataloader_input_trains_and_validates(digits):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(digits.x_train, digits.y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=200)
    model = tiny_mlp()
    history = Trainer(model, "fgsm-rs", threat=THREAT, epochs=2, optimizer="adam", lr=3e-3, progress=False,
                      val_max_samples=300).fit(loader, val)
    assert history[-1]["val_clean_acc"] > 0.7 and history[-1]["val_robust_acc"] is not None
    assert all("guard" in m for m in history)


@pytest.mark.filterwarnings("ignore:final_suite")
def test_final_suite_evaluates_the_trained_model(digits, tmp_path):
    model, trainer = train("fgsm", digits, epochs=1, run_dir=tmp_path, final_suite="standard",
                           val=(digits.x_test[:60], digits.y_test[:60]))
    final = trainer.history[-1]["final"]
    assert final["n_samples"] == 60 and 0 <= final["robust_acc"] <= final["clean_acc"] <= 1
    if final["suite"] == "standard":
        assert (tmp_path / "robustness.json").is_file() and final["attacks_run"]
    else:  # the suite's attacks are not all in this checkout: the documented, labelled fallback
        assert final["suite"].startswith("pgd-50x5 (fallback") and not (tmp_path / "robustness.json").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["final"] == final
