"""Shared pieces of the ``gradguard`` commands: the one-line-error parser, option groups, value parsers, tables."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Sequence

from ..errors import ConfigError

# The commands in the order --help lists them (cli/__init__.py registers one module each; `list` is listing.py).
COMMANDS = ("demo", "train", "attack", "evaluate", "certify", "diagnose", "report", "list")
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# The reader of stdout/stderr went away while the command was still working (`gradguard train 2>&1 | head -1`):
# 128 + SIGPIPE, the status a shell shows for a program that a closed pipe ended. Once the work is done and only
# the printing of its result is cut short (`gradguard list --json | head -1`), the exit status is 0.
EXIT_CLOSED_PIPE = 141


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other gradguard error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from .launch import launch_rank

        if launch_rank() != 0:  # under torchrun every rank parses the same options: rank 0 says it once
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_command(commands: Any, name: str, *, examples: Sequence[str], **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose description keeps its line breaks and whose --help ends with an "examples:" section."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return parser


# ------------------------------------------------------------------------------------------------ option groups
def common_options() -> argparse.ArgumentParser:
    """--seed, --device, --threads, --config, --json: taken by every command (argparse ``parents=``)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--seed", type=int, default=0, help="fixes data order, random starts and restarts (default 0)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N; under "
                       "torchrun each process takes cuda:LOCAL_RANK")
    group.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="CPU threads torch uses for this command (torch.set_num_threads; default: torch's own, "
                       "one per core); lower it on a shared machine or with several torchrun processes per node")
    group.add_argument("--config", metavar="FILE", help="read options from a .toml/.json (or .yaml with PyYAML) file; "
                       "flags on the command line win")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    return common


def device_options(parser: argparse.ArgumentParser, *, amp: bool = True) -> None:
    """--amp (attack gradients under autocast) and --channels-last, for the commands that run a model."""
    group = parser.add_argument_group("device")
    if amp:
        group.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                           help="attack gradients and queries under autocast in bf16 or fp16 (GPU speed); every "
                           "success is re-checked in float32 (default: float32 throughout)")
    group.add_argument("--channels-last", action="store_true",
                       help="run the model and attacks in the channels_last (NHWC) memory layout, faster for "
                       "convolutions on GPUs")
    if amp:
        group.add_argument("--compile", action="store_true",
                           help="run the attacks' passes through torch.compile (falls back to eager with one "
                           "warning if compiling fails); pays on larger models after a minute of compiling")


def threat_options(parser: argparse.ArgumentParser, eps_help: str) -> None:
    group = parser.add_argument_group("threat model")
    group.add_argument("--norm", choices=["linf", "l2", "l1"], default=None, help="perturbation norm (default linf)")
    group.add_argument("--eps", type=eps_value, default=None, help=f"{eps_help}; a number or a fraction such as "
                       "8/255, in the data's units (images in [0, 1]); an eps that covers the whole box is refused, "
                       "one above 0.3 of it warns (docs/evaluate.md)")


def data_options(parser: argparse.ArgumentParser, *, dataset_default: str | None, samples_default: int | None,
                 samples_help: str, split: bool = False) -> None:
    """--dataset --data-root --resize --center-crop --classes --samples, and --split for the commands that only
    evaluate (``split=True``)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=dataset_default,
                       help="digits | mnist | fashion-mnist | cifar10 | cifar100 | npz:PATH | npy:DIR | folder:PATH" + (
                           f" (default {dataset_default})" if dataset_default else " (default: the run's dataset)"))
    group.add_argument("--data-root", help="folder with the MNIST / Fashion-MNIST IDX files or the CIFAR binary "
                       "batches (else $GRADGUARD_DATA, then /usr/share/datasets/NAME)")
    group.add_argument("--resize", metavar="H[,W]", help="folder: resize each image (the short side to H, or to "
                       "H x W) as it is read")
    group.add_argument("--center-crop", metavar="H[,W]", help="folder: then crop the centre H x H (or H x W)")
    group.add_argument("--classes", metavar="A,B,...", help="the class names in label order (label 0 first): a "
                       "folder's class subfolders, each once (else classes.txt in the folder, else alphabetical), or "
                       "names for npy:/npz: labels")
    if split:
        group.add_argument("--split", choices=["all", "test", "train"], default=None,
                           help="which samples: the source's test split (default where it has one), all of a "
                           "source without one (the default there, except for a model trained on its seeded split: "
                           "test), or the seeded 25 %% test / 75 %% train part of it")
    group.add_argument("--samples", type=positive_int, default=samples_default, help=samples_help)


# ------------------------------------------------------------------------------------------------ value parsers
def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def eps_value(text: str) -> float:
    """An eps: a number >= 0 or a fraction such as 8/255 (8 of 255 pixel levels, exactly the float 8/255)."""
    try:
        value = number_or_fraction(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def number_or_fraction(text: str) -> float:
    """"0.03" -> 0.03, "8/255" -> 8 / 255; a ValueError that says what is wrong otherwise."""
    numerator, slash, denominator = str(text).strip().partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(numerator)
    except ZeroDivisionError:
        raise ValueError(f"{text!r} divides by zero; write a fraction such as 8/255") from None
    except ValueError:
        raise ValueError(f"{text!r} is not a number or a fraction such as 8/255") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def parse_eps_list(text: str | Sequence[float]) -> list[float]:
    """"0,0.05,0.1" or "0,2/255,8/255" (or a list from a config file) -> sorted distinct eps values, each finite
    and >= 0."""
    values = text if isinstance(text, (list, tuple)) else [v for v in str(text).split(",") if v.strip()]
    try:
        eps = [number_or_fraction(v) for v in values]
    except ValueError as error:
        raise ConfigError(f"curve: {error} (in {text!r})") from None
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ConfigError(f"curve: eps values must be finite and >= 0, got {text!r}")
    return sorted(set(eps))


def parse_names(text: str | Sequence[str], argument: str) -> list[str]:
    names = list(text) if isinstance(text, (list, tuple)) else [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{argument}: give at least one name")
    return names


def suite_arg(value: Any) -> Any:
    """A suite name ("quick", "standard", ...) as is; anything else as a list of attack names."""
    if isinstance(value, (list, tuple)):
        return list(value)
    from ..evaluation import SUITES

    value = str(value)
    if value in SUITES:
        return value
    return parse_names(value, "suite")


def key_values(items: Sequence[str] | None, argument: str) -> dict:
    """KEY=VALUE strings -> dict; values are parsed as JSON when they can be (numbers, true/false, lists)."""
    result = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"{argument}: expected KEY=VALUE, got {item!r}")
        try:
            result[key] = json.loads(value)
        except ValueError:
            result[key] = value
    return result


# ------------------------------------------------------------------------------------------------ printing
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def headline_text(summary: dict) -> str:
    """The report's headline as a table: per model its sample count, clean, single attacks and worst case at the
    headline threat, all on those samples, and what the worst case includes; below it the results kept apart
    (other samples, other threats), each labelled with its threat and sample count."""
    from ..report.builder import apart_rows, headline_columns, threat_text
    from ..report.summary import ordered_attacks, worst_case_text

    attacks = headline_columns(summary)
    rows = [[m["label"], m.get("n_samples"), m["clean_accuracy"], *[m["attacks"].get(a) for a in attacks],
             m["robust_accuracy"], m["masking_verdict"]] for m in summary["models"]]
    text = f"threat: {threat_text(summary)}\n"
    text += format_table(["model", "samples", "clean", *attacks, "worst case", "masking"], rows) if rows else "no models"
    text += "".join(f"\n{worst_case_text(m)}" for m in summary["models"])
    others = apart_rows(summary)
    if others:
        other_attacks = ordered_attacks(a for _, g in others for a in g["attacks"])
        text += "\n\non other samples or at other threats (not in the worst case above):\n" + format_table(
            ["model", "threat", "samples", "clean", *other_attacks, "worst case"],
            [[label, g["label"], g.get("n_samples"), g.get("clean_accuracy"),
              *[g["attacks"].get(a) for a in other_attacks], g["robust_accuracy"]] for label, g in others])
    for g in summary.get("gradients", []):
        text += f"\ngradient flow {g['label']}: {', '.join(g['kinds']) or 'no issue found'}"
    return text
