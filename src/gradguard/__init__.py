"""gradguard: attack, harden and diagnose PyTorch models through their gradients."""
from .errors import (BoundsError, CheckpointError, ConfigError, DataError, GradguardError, InputError,
                     ModelOutputError, ShapeError)
from .diagnostics import Finding, GradientMonitor
from .models import Normalized, build_model, list_models
from .threat import L1, L2, Linf, ThreatModel, make_threat

__version__ = "0.1.0"

__all__ = [
    "Linf", "L2", "L1", "ThreatModel", "make_threat", "Normalized",
    "GradguardError", "InputError", "ShapeError", "BoundsError", "ModelOutputError", "ConfigError",
    "DataError", "CheckpointError",
]
__all__ += ["GradientMonitor", "Finding"]
from .train import Trainer  # noqa: E402  (after __version__: models.save reads it)

__all__ += ["Trainer", "build_model", "list_models"]
from .data import Dataset, list_datasets, load_dataset  # noqa: E402
from .report import build_report  # noqa: E402  (after __version__: the report footer reads it)

__all__ += ["Dataset", "load_dataset", "list_datasets", "build_report"]
from .evaluation import RobustnessCurve, RobustnessReport, evaluate, evaluate_curve  # noqa: E402

__all__ += ["evaluate", "evaluate_curve", "RobustnessReport", "RobustnessCurve"]
