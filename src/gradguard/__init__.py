"""gradguard: attack, harden and diagnose PyTorch models through their gradients."""

from . import attacks  # noqa: E402  (gradguard.attacks.FGSM, PGD, APGD, ...)
from ._version import __version__ as __version__  # the version lives in its own module
from .data import Dataset, SampleSet, list_datasets, load_dataset, open_split  # noqa: E402
from .diagnostics import Finding, GradientMonitor, check_masking  # noqa: E402
from .errors import (  # noqa: E402
                     BoundsError,
                     CheckpointError,
                     ConfigError,
                     DataError,
                     GradguardError,
                     InputError,
                     ModelOutputError,
                     ShapeError,
)
from .evaluation import RobustnessCurve, RobustnessReport, evaluate, evaluate_curve  # noqa: E402
from .evaluation.certify import CertifyResult, certify  # noqa: E402
from .models import Logits, Normalized, build_model, list_models  # noqa: E402
from .report import build_report  # noqa: E402
from .threat import L1, L2, LargeEpsWarning, Linf, ThreatModel, make_threat  # noqa: E402
from .train import Trainer  # noqa: E402

__all__ = [
    # threat models and attacks
    "Linf", "L2", "L1", "ThreatModel", "make_threat", "LargeEpsWarning", "Logits", "Normalized", "attacks",
    # evaluation and diagnostics
    "evaluate", "evaluate_curve", "RobustnessReport", "RobustnessCurve", "check_masking",
    "GradientMonitor", "Finding", "certify", "CertifyResult",
    # training, models, data, reports
    "Trainer", "build_model", "list_models", "Dataset", "load_dataset", "list_datasets", "build_report",
    "open_split", "SampleSet",  # streamed data; any model: gradguard.models.resolve; run dirs: gradguard.workflow
    # errors
    "GradguardError", "InputError", "ShapeError", "BoundsError", "ModelOutputError", "ConfigError",
    "DataError", "CheckpointError",
]
