"""The run directory as a callback: ``config.json``, ``metrics.jsonl``, ``steps.jsonl``, ``events.jsonl``, the
saved model, checkpoints (gathering every callback's ``state_dict``) and resume. Only the main process writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, ResumeMismatchError, describe_changes
from ..io import atomic_write_json, atomic_write_text
from ..layout import CHECKPOINT_DIR, CHECKPOINT_RECORDS, CONFIG_FILE, EVENTS_FILE, METRICS_FILE, STEPS_FILE
from ..models import save as save_model
from ..models import state_tensors, unwrap
from ..runtime import distributed
from .callbacks.base import TrainCallback, TrainerLike
from .checkpoint import (
    capture_rng,
    flatten_optimizer,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer,
)
from .options import RESUME_KEYS


class RunDirWriter(TrainCallback):
    """Writes the run into ``run_dir`` and, with ``resume``, restores it from the newest valid checkpoint (setting
    ``trainer.start_epoch``). It must come last in ``trainer.callbacks``: resume restores the others' state."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir = run_dir
        self.resume = resume

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: TrainerLike) -> None:
        """Write config.json, or restore from the newest checkpoint when resuming (sets the start epoch)."""
        checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        found = latest_checkpoint(checkpoint_dir) if self.resume else None
        if not self.resume and any(checkpoint_dir.glob(CHECKPOINT_RECORDS)):
            raise ConfigError(f"run_dir: {str(self.run_dir)!r} already holds a run; pass resume=True to continue it "
                              "or choose a new directory")
        if found is None:
            if trainer.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.run_dir / CONFIG_FILE, trainer.config)
            distributed.barrier()
            return
        tensors, state = found
        self.check_resume_config(trainer)
        model_state = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
        unwrap(trainer.model).load_state_dict(model_state)
        trainer.optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
        restore_rng(tensors, state["rng"])
        trainer.method.load_state_dict(state["method"])
        for callback in trainer.callbacks:
            if callback is not self:
                callback.load_state_dict(tensors, state)
        trainer.history, trainer.events = state["history"], state.get("events", [])
        trainer.lr_scale = state["lr_scale"]
        if trainer.is_main:
            self.truncate_steps_log(state["epoch"] * trainer.steps_per_epoch)
            self.write_metrics(trainer)
        distributed.barrier()
        trainer.start_epoch = int(state["epoch"])

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, metrics: dict, step_log: list[dict]) -> None:
        if not trainer.is_main:
            return
        with open(self.run_dir / STEPS_FILE, "a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in step_log)
        self.write_metrics(trainer)
        with trainer._evaluated_weights():
            save_model(trainer.model, self.run_dir, **self.model_metadata_for(trainer, epoch))
        self.save_checkpoint(trainer, epoch)

    def on_event(self, trainer: TrainerLike, event: dict) -> None:
        with open(self.run_dir / EVENTS_FILE, "a") as handle:
            handle.write(json.dumps(event) + "\n")

    def on_metrics(self, trainer: TrainerLike) -> None:
        self.write_metrics(trainer)

    def on_final_weights(self, trainer: TrainerLike, epoch: int) -> None:
        if trainer.is_main and trainer.history:
            save_model(trainer.model, self.run_dir, **self.model_metadata_for(trainer, epoch))
            self.write_metrics(trainer)

    # ------------------------------------------------------------------------------------------------ files
    def check_resume_config(self, trainer: TrainerLike) -> None:
        path = self.run_dir / CONFIG_FILE
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"run_dir: cannot read {str(path)!r} to resume ({error})") from None
        current = json.loads(json.dumps(trainer.config, default=str))
        different = [key for key in RESUME_KEYS if key != "method" and stored.get(key) != current.get(key)]
        if stored.get("method", {}).get("name") != current["method"]["name"]:
            different.append("method")
        if different:
            changes = {key: (stored.get(key), current.get(key)) for key in different}
            raise ResumeMismatchError(f"resume: the run in {str(self.run_dir)!r} was trained with other settings "
                                      f"({describe_changes(changes)}); resume with the recorded settings, or train "
                                      "into a new run_dir", changes, where=str(self.run_dir))

    def save_checkpoint(self, trainer: TrainerLike, epoch: int) -> None:
        optimizer_tensors, optimizer_meta = flatten_optimizer(trainer.optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng()
        tensors = {f"model.{key}": value for key, value in state_tensors(trainer.model).items()}
        tensors.update(optimizer_tensors)
        tensors.update(rng_tensors)
        # "best" is in every checkpoint (None without robust early stopping, whose state fills it in)
        state: dict[str, Any] = {"epoch": epoch, "optimizer": optimizer_meta, "rng": rng_meta,
                                 "method": trainer.method.state_dict(), "history": trainer.history,
                                 "events": trainer.events, "lr_scale": trainer.lr_scale, "best": None}
        for callback in trainer.callbacks:
            callback_tensors, callback_state = callback.state_dict()
            tensors.update(callback_tensors)
            state.update(callback_state)
        save_checkpoint(self.run_dir / CHECKPOINT_DIR, epoch, tensors, state)

    @staticmethod
    def model_metadata_for(trainer: TrainerLike, epoch: int) -> dict:
        """The saved model's sidecar fields: dataset, threat, method, epoch, its metrics and the callbacks' own."""
        metrics = trainer.history[epoch - 1] if 0 < epoch <= len(trainer.history) else None
        extra: dict[str, Any] = {}
        for callback in trainer.callbacks:
            extra.update(callback.model_metadata())
        return {"dataset": trainer.metadata.get("dataset"), "threat": trainer.config["threat"],
                "method": trainer.method.config(), "epoch": epoch, "metrics": metrics, **extra,
                **{k: v for k, v in trainer.metadata.items() if k != "dataset"}}

    def write_metrics(self, trainer: TrainerLike) -> None:
        if trainer.is_main:
            atomic_write_text(self.run_dir / METRICS_FILE,
                              "".join(json.dumps(record, default=str) + "\n" for record in trainer.history))

    def truncate_steps_log(self, steps_done: int) -> None:
        path = self.run_dir / STEPS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < steps_done:
                    kept.append(line + "\n")
            except (ValueError, KeyError):
                continue  # a line cut short by the crash
        atomic_write_text(path, "".join(kept))
