"""GradientMonitor inside Lightning, the Hugging Face Trainer and TensorBoard: real, tiny fits on CPU.

`make test` installs the frameworks (requirements-test.txt), so these run there; ``pytest.importorskip`` only
guards a bare checkout. The frameworks are imported inside the tests, not at collection (Lightning alone takes
seconds), so selecting other tests stays fast.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradguard.diagnostics import GradientMonitor
from gradguard.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LR = 0.1


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def random_classification(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 2, (n,), generator=generator)


def check_plain_sgd_records(records: list[dict], clipped: bool) -> None:
    """With plain SGD (no momentum, no decay) Δθ = lr·g for the gradient the optimiser applied: the recorded
    update norm equals lr × the recorded gradient norm only if the gradient was read for this very step, after
    clipping. A stale gradient (the previous step's) or a pre-clipping one breaks the equality."""
    assert records
    for record in records:
        assert close(record["update_norm"], LR * record["grad_norm"]), record
    if clipped:
        assert any(r["raw_grad_norm"] > 1.01 * r["grad_norm"] for r in records)  # clipping did act


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def event_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """{tag: [(step, value)]} and the text tags of the event files in ``log_dir``."""
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = accumulator_module.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, list(tags["tensors"])


def check_tensorboard_matches(records: list[dict], log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    scalars, texts = event_scalars(log_dir)
    for record in records:
        for key in ("grad_norm", "weight_norm", "update_ratio"):
            tag = f"gradflow/{record['layer']}/{key}"
            assert (record["step"], pytest.approx(record[key], rel=1e-6)) in scalars[tag], (tag, record)
        rms = record["grad_norm"] / math.sqrt(record["numel"])
        assert (record["step"], pytest.approx(rms, rel=1e-6)) in scalars[f"gradflow/{record['layer']}/grad_rms"]
    losses = sorted({(r["step"], r["loss"]) for r in records if r["loss"] is not None})
    assert losses and [(step, pytest.approx(loss, rel=1e-6)) for step, loss in losses] == scalars["gradflow/loss"]
    assert "gradflow/findings/text_summary" in texts
    return scalars


# ------------------------------------------------------------------------------------------------ packaging
def test_importing_gradguard_imports_no_framework_and_a_missing_one_names_its_extra():
    code = """
import sys
import gradguard, gradguard.integrations
heavy = [m for m in ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard",
                     "torch.utils.tensorboard") if m in sys.modules]
assert not heavy, heavy
for name in ("lightning", "transformers", "torch.utils.tensorboard"):
    sys.modules[name] = None  # as if not installed
from gradguard.errors import MissingDependencyError
for module in ("lightning", "huggingface", "tensorboard"):
    try:
        __import__(f"gradguard.integrations.{module}")
    except MissingDependencyError as error:
        assert isinstance(error, ImportError)
        print(error)
    else:
        raise AssertionError(module)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("install it with: ")[-1] for line in lines] == [
        "pip install gradguard[lightning]", "pip install gradguard[huggingface]", "pip install gradguard[tensorboard]"]


# ------------------------------------------------------------------------------------------------ Lightning
def lightning_module(pl, nan_at: int | None = None):
    """A two-layer MLP whose training_step logs its losses; from global step ``nan_at`` on, the loss is NaN."""

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if nan_at is not None and self.global_step >= nan_at:
                loss = loss * float("nan")
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    return Tiny()


def lightning_fit(pl, callback, tmp_path: Path, module, **trainer_kwargs):
    x, y = random_classification()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    options = dict(accelerator="cpu", devices=1, max_steps=20, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = pl.Trainer(callbacks=[callback], **{**options, **trainer_kwargs})
    with warnings.catch_warnings():  # Lightning's advice on workers and loggers is noise here
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|litlogger|log_every_n_steps).*")
        trainer.fit(module, loader)
    return trainer


def test_lightning_callback_counts_optimizer_steps_streams_to_tensorboard_and_writes_the_diagnosis(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradguard.integrations.lightning import GradientHealthCallback

    # Plain fit, clipped, with a TensorBoardLogger: gradflow.jsonl goes to the logger's run directory and the
    # records are streamed into the logger's own event file.
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    callback = GradientHealthCallback(every=5, tensorboard=True)
    module = lightning_module(pl)
    trainer = lightning_fit(pl, callback, tmp_path, module, logger=logger, gradient_clip_val=0.05)
    monitor = callback.monitor
    assert trainer.global_step == 20 and monitor is not None and monitor.step_count == 20
    assert not monitor.attached and callback.stopped is None and not trainer.should_stop
    run_dir = Path(logger.log_dir)
    assert callback.gradflow_path == run_dir / "gradflow.jsonl"
    records = monitor.records
    assert sorted({r["step"] for r in records}) == [0, 5, 10, 15]
    assert {r["layer"] for r in records} == {"net.0", "net.2"}
    assert read_jsonl(run_dir / "gradflow.jsonl") == json.loads(json.dumps(records))
    check_plain_sgd_records(records, clipped=True)
    for record in records:  # the loss handed over from on_train_batch_end's outputs is that step's
        assert close(record["loss"], module.losses[record["step"]], 1e-6)
    diagnosis = json.loads((run_dir / "diagnosis.json").read_text())
    assert diagnosis["gradient_findings"] == [f.to_dict() for f in callback.findings]
    assert diagnosis["stopped"] is None and diagnosis["steps"] == 20 and diagnosis["sampled_steps"] == 4
    check_tensorboard_matches(records, run_dir)

    # Gradient accumulation: 2 batches per optimiser step, counted once; logger=False puts the files in
    # default_root_dir.
    callback = GradientHealthCallback(every=5)
    module = lightning_module(pl)
    trainer = lightning_fit(pl, callback, tmp_path / "accumulate", module, max_steps=10, accumulate_grad_batches=2)
    assert len(module.losses) == 20 and trainer.global_step == 10 and callback.monitor.step_count == 10
    assert sorted({r["step"] for r in callback.monitor.records}) == [0, 5]
    check_plain_sgd_records(callback.monitor.records, clipped=False)
    assert (tmp_path / "accumulate" / "gradflow.jsonl").exists()
    assert (tmp_path / "accumulate" / "diagnosis.json").exists()


def test_lightning_callback_stops_cleanly_at_a_planted_nan(tmp_path, caplog):
    pl = pytest.importorskip("lightning.pytorch")
    from gradguard.integrations.lightning import GradientHealthCallback

    callback = GradientHealthCallback(every=5, on_finding="stop")
    module = lightning_module(pl, nan_at=7)
    with caplog.at_level("WARNING", logger="gradguard.integrations"):
        trainer = lightning_fit(pl, callback, tmp_path, module)  # no exception escapes fit()
    assert trainer.should_stop and trainer.global_step == 8  # stopped right after the first NaN step
    assert callback.stopped is not None and callback.stopped.step == 7
    assert callback.stopped.finding.kind == "nonfinite"
    assert "nonfinite" in [f.kind for f in callback.findings]
    assert any("stopped training" in r.getMessage() for r in caplog.records)
    diagnosis = json.loads((tmp_path / "diagnosis.json").read_text())
    assert diagnosis["stopped"]["kind"] == "nonfinite" and diagnosis["stopped"]["step"] == 7
    assert diagnosis["gradient_findings"][0]["kind"] == "nonfinite"
    assert diagnosis["actions"] == [{"step": 7, "kind": "nonfinite", "layer": "(loss)", "action": "stop"}]
    assert not callback.monitor.attached


def test_lightning_callback_cleans_up_when_the_fit_fails(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradguard.integrations.lightning import GradientHealthCallback

    module = lightning_module(pl)
    step = module.training_step

    def failing_step(batch, batch_idx):
        if module.global_step == 5:  # a sampled step: the monitor's hooks are armed when this raises
            raise RuntimeError("user code failed")
        return step(batch, batch_idx)

    module.training_step = failing_step
    callback = GradientHealthCallback(every=5)
    with pytest.raises(RuntimeError, match="user code failed"):
        lightning_fit(pl, callback, tmp_path, module)
    assert not callback.monitor.attached
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in module.modules())  # hooks removed
    diagnosis = json.loads((tmp_path / "diagnosis.json").read_text())  # what was seen before the failure
    assert diagnosis["steps"] == 5 and diagnosis["sampled_steps"] == 1


# ------------------------------------------------------------------------------------------------ Hugging Face
class TinyHF(nn.Module):
    """The Trainer's model contract without a tokenizer: dict batches in, {"loss", "logits"} out."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.nan_at = nan_at
        self.losses: list[float] = []

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels)
        if self.training:
            if self.nan_at is not None and len(self.losses) >= self.nan_at:
                loss = loss * float("nan")
            self.losses.append(loss.item())
        return {"loss": loss, "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = random_classification()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "labels": self.y[index]}


def huggingface_train(callback, tmp_path: Path, model: nn.Module, **args_kwargs):
    transformers = pytest.importorskip("transformers")
    options = dict(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16, learning_rate=LR,
                   optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to="none", use_cpu=True,
                   save_strategy="no", disable_tqdm=True, logging_steps=50, seed=0)
    args = transformers.TrainingArguments(**{**options, **args_kwargs})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DictDataset(), callbacks=[callback])
    trainer.train()
    return trainer


def test_huggingface_callback_records_each_optimizer_step_and_writes_the_diagnosis(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradguard.integrations.huggingface import GradientHealthCallback

    callback = GradientHealthCallback(every=5, tensorboard=True)
    model = TinyHF()
    trainer = huggingface_train(callback, tmp_path, model, max_grad_norm=0.05)
    monitor = callback.monitor
    assert trainer.state.global_step == 20 and monitor is not None and monitor.step_count == 20
    assert not monitor.attached and callback.stopped is None
    records = monitor.records
    assert sorted({r["step"] for r in records}) == [0, 5, 10, 15]
    assert read_jsonl(tmp_path / "gradflow.jsonl") == json.loads(json.dumps(records))
    check_plain_sgd_records(records, clipped=True)  # read after the Trainer's max_grad_norm clipping
    for record in records:  # the forward hook's loss is the step's own
        assert close(record["loss"], model.losses[record["step"]], 1e-6)
    diagnosis = json.loads((tmp_path / "diagnosis.json").read_text())
    assert diagnosis["gradient_findings"] == [f.to_dict() for f in callback.findings] and diagnosis["stopped"] is None
    check_tensorboard_matches(records, tmp_path)
    assert not model._forward_hooks  # the loss hook is removed at the end


def test_huggingface_callback_stops_cleanly_at_a_planted_nan(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradguard.integrations.huggingface import GradientHealthCallback

    callback = GradientHealthCallback(every=5, on_finding="stop")
    trainer = huggingface_train(callback, tmp_path, TinyHF(nan_at=7))
    assert trainer.state.global_step == 8 and trainer.control.should_training_stop
    assert callback.stopped is not None and callback.stopped.step == 7
    assert callback.stopped.finding.kind == "nonfinite"
    diagnosis = json.loads((tmp_path / "diagnosis.json").read_text())
    assert diagnosis["stopped"]["kind"] == "nonfinite" and diagnosis["gradient_findings"][0]["kind"] == "nonfinite"


def test_callbacks_reject_bad_arguments_by_name():
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from gradguard.integrations import huggingface, lightning

    for module in (lightning, huggingface):
        with pytest.raises(ConfigError, match="every"):
            module.GradientHealthCallback(every=0)
        with pytest.raises(ConfigError, match="on_finding"):
            module.GradientHealthCallback(on_finding="shout")
        with pytest.raises(ConfigError, match="tensorboard"):
            module.GradientHealthCallback(tensorboard=3)
        with pytest.raises(ConfigError, match="path"):
            module.GradientHealthCallback(path=5)
        before = module.GradientHealthCallback().findings  # nothing measured yet is not an all-clear
        assert [f.kind for f in before] == ["unrecorded"]


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_write_tensorboard_round_trips_records_and_findings(tmp_path):
    pytest.importorskip("tensorboard")
    from gradguard.errors import InputError
    from gradguard.integrations.tensorboard import write_tensorboard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = random_classification(64)
    with GradientMonitor(model, every=3, optimizer=optimizer, path=tmp_path / "gradflow.jsonl") as monitor:
        for _ in range(10):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    log_dir = write_tensorboard(monitor, tmp_path / "tb")
    assert log_dir == str(tmp_path / "tb")
    scalars = check_tensorboard_matches(monitor.records, tmp_path / "tb")
    assert [step for step, _ in scalars["gradflow/0/saturated_fraction"]] == [0, 3, 6, 9]
    assert "gradflow/0/input_rms" in scalars and "gradflow/0/loss" not in scalars  # loss is per step, not layer

    # From the file alone, into an open writer (left open for the caller).
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "from-file"))
    write_tensorboard(tmp_path / "gradflow.jsonl", writer)
    writer.add_scalar("still/open", 1.0, 0)
    writer.close()
    again, _ = event_scalars(tmp_path / "from-file")
    assert again["gradflow/2/grad_norm"] == scalars["gradflow/2/grad_norm"] and "still/open" in again
    with pytest.raises(InputError, match="writer"):
        write_tensorboard(monitor, 42)
    with pytest.raises(InputError, match="source"):
        write_tensorboard([{"no": "step"}], tmp_path / "bad")
