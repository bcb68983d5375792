"""``gradguard train --out DIR``: train a model (standard or adversarial) into a new run directory."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    add_command,
    data_options,
    device_options,
    format_table,
    key_values,
    non_negative_float,
    positive_int,
    threat_options,
)
from .model_source import logits_option

MLP_OPTIONS = ("depth", "width", "activation", "init")


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "train", parents=[common], help="train a model (standard or adversarial) into a new run directory",
        description="Train a zoo model with gradguard.train.Trainer and save config.json, metrics.jsonl, "
        "model.safetensors + model.json and checkpoints to --out.",
        examples=["gradguard train --out runs/std --epochs 20",
                  "gradguard train --out runs/pgd --method pgd --eps 0.1 --clip-grad-norm 1.0 --l2 5e-4",
                  "gradguard train --out runs/sig --depth 8 --activation sigmoid --init normal --monitor",
                  "gradguard train --out runs/awp --method trades --method-arg awp_gamma=0.005 --eps 0.1 --ema 0.99 "
                  "--early-stop robust",
                  "gradguard train --out runs/mine --model mymodels:Net --model-kwargs width=2 --dataset cifar10 "
                  "--data-root ~/data/cifar-10-batches-bin --method pgd --eps 0.03"])
    parser.add_argument("--out", required=True, help="run directory to create (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--model", default="mlp", metavar="SPEC", help="the architecture: a zoo model (see `gradguard "
                        "list models`; default mlp), or package.module:callable, torchvision:NAME, timm:NAME")
    parser.add_argument("--depth", type=positive_int, help="mlp: hidden layers")
    parser.add_argument("--width", type=positive_int, help="mlp: hidden units per layer")
    parser.add_argument("--activation", help="mlp: relu, sigmoid, tanh, gelu, leaky_relu, elu")
    parser.add_argument("--init", help="mlp: default, he, xavier, normal (N(0, 0.01²)), large (N(0, 1))")
    parser.add_argument("--model-arg", "--model-kwargs", dest="model_arg", action="append", metavar="KEY=VALUE",
                        help="any other model keyword (repeatable)")
    parser.add_argument("--mean", metavar="M", help="input normalisation inside the model: one value or one per "
                        "channel, e.g. 0.49,0.48,0.45 (eps stays in pixel space)")
    parser.add_argument("--std", metavar="S", help="input normalisation: one value or one per channel")
    logits_option(parser)
    parser.add_argument("--method", default="standard",
                        help="standard | fgsm | fgsm-rs | pgd | trades | gaussian | input-grad-reg | cure | gradalign "
                        "| mart (default standard; `gradguard list methods`)")
    parser.add_argument("--method-arg", action="append", metavar="KEY=VALUE",
                        help="method option, e.g. beta=6.0 for trades, steps=10 for pgd, sigma=0.25 for gaussian, "
                        "lam=1.0 for input-grad-reg, gamma=4 for cure, lam=0.2 for gradalign, awp_gamma=0.005 for "
                        "pgd/trades/mart (repeatable)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="adam", help="optimiser (default adam)")
    parser.add_argument("--schedule", choices=["constant", "cyclic", "piecewise"], default="constant",
                        help="learning-rate schedule (default constant)")
    parser.add_argument("--eps-warmup-epochs", type=non_negative_float, default=0.0,
                        help="ramp eps linearly from 0 over this many epochs (default 0)")
    parser.add_argument("--lr", type=non_negative_float, help="learning rate (default 1e-3 adam, 0.1 sgd)")
    parser.add_argument("--clip-grad-norm", type=non_negative_float, help="clip the global gradient norm to this value")
    parser.add_argument("--clip-grad-value", type=non_negative_float, help="clip each gradient element to ±value")
    parser.add_argument("--l2", type=non_negative_float, default=0.0, help="explicit L2 penalty r·‖θ‖² (default 0)")
    parser.add_argument("--train-samples", type=positive_int, help="use only the first N training samples")
    parser.add_argument("--val-attack", choices=["pgd", "fgsm", "none"], default="pgd",
                        help="per-epoch validation attack when a threat is set (default pgd: PGD-10)")
    parser.add_argument("--ema", type=float, metavar="DECAY",
                        help="keep an exponential moving average of the weights (decay in (0, 1), e.g. 0.999); "
                        "validation and the saved model use it")
    parser.add_argument("--early-stop", choices=["robust"],
                        help="robust: keep the epoch with the best validation robust accuracy and restore it at the end")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of --out from its last finished epoch (same settings)")
    parser.add_argument("--monitor", action="store_true", help="record gradient flow (gradflow.jsonl) with GradientMonitor")
    parser.add_argument("--monitor-every", type=positive_int, default=10, help="monitor every N steps (default 10)")
    parser.add_argument("--on-finding", choices=["warn", "stop"],
                        help="with --monitor: warn when a gradient finding first appears, or stop training at a "
                        "fatal one (NaN/inf, exploding) and keep the last saved epoch")
    data_options(parser, dataset_default="digits", samples_default=500,
                 samples_help="validation samples per epoch (default 500)")
    threat_options(parser, "training / validation budget (default 0.1 for linf; needed by adversarial methods)")
    device_options(parser, amp=False)  # training runs in float32
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from .. import workflow
    from ..models.outputs import parse_logits_key

    device = workflow.resolve_device(args.device)
    dataset = workflow.load_data(args.dataset, args.data_root, resize=args.resize, center_crop=args.center_crop,
                                 classes=args.classes)
    from ..train import METHODS

    method = METHODS.get(args.method)
    needs_threat = method is None or method.needs_threat or args.eps is not None
    threat = workflow.make_threat_from(args.norm, args.eps) if needs_threat else None
    out = Path(args.out)
    averaging = trainer_options(args, threat)
    with workflow.staged_run_dir(out, replace=args.force, resumable=True, resume=args.resume) as staging:
        manifest = workflow.train_into(
            staging, dataset, model_name=args.model, model_kwargs=model_kwargs(args), method=args.method,
            threat=threat, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            clip_grad_norm=args.clip_grad_norm, clip_grad_value=args.clip_grad_value, l2=args.l2,
            train_samples=args.train_samples, val_samples=args.samples,
            val_attack=None if args.val_attack == "none" or threat is None else args.val_attack,
            monitor_every=args.monitor_every if args.monitor or args.on_finding else None, seed=args.seed,
            device=device, on_finding=args.on_finding,
            label=out.name, extra={"data_root": args.data_root, "resize": args.resize, "center_crop": args.center_crop},
            method_kwargs=key_values(args.method_arg, "method-arg"),
            schedule=args.schedule, eps_warmup_epochs=args.eps_warmup_epochs, resume=args.resume,
            channels_last=args.channels_last, mean=args.mean, std=args.std,
            logits=parse_logits_key(args.logits), **averaging)
    workflow.say_notes()  # which samples, which classes: said once the work is done (an error stays one line)
    history = manifest.pop("history")
    rows = [[r.get("epoch"), r.get("train_loss"), r.get("train_clean_acc"), r.get("val_clean_acc"),
             r.get("val_robust_acc")] for r in history]
    text = format_table(["epoch", "train loss", "train acc", "val clean", "val robust"], rows)
    result = {"run_dir": str(out), "final": history[-1] if history else {}, "epochs": len(history),
              "manifest": manifest}
    stopped = manifest.get("stopped")
    if stopped is not None:
        result["stopped"] = stopped
        finding = stopped["finding"]
        return result, (f"{text}\n\nTRAINING STOPPED at epoch {stopped['epoch']}, step {stopped['step']}: "
                        f"{finding['kind']} in {finding['layer']}; {stopped['action']}.\n  advice: {finding['advice']}\n"
                        f"run directory: {out}/ (events.jsonl, gradflow.jsonl; `gradguard diagnose {out}`)")
    return result, f"{text}\n\nmodel saved in {out}/ (model.safetensors, metrics.jsonl)"


def trainer_options(args: argparse.Namespace, threat: Any) -> dict:
    """``ema_decay`` / ``early_stop`` for the Trainer, only when asked for; both checked here so a bad value fails
    before a run directory is staged."""
    from ..errors import ConfigError
    from ..train.trainer import ema_decay_value

    options: dict[str, Any] = {}
    if args.ema is not None:
        options["ema_decay"] = ema_decay_value(args.ema)
    if args.early_stop is not None:
        if threat is None or args.val_attack == "none":
            raise ConfigError("early-stop: 'robust' needs a validation attack; give --eps and leave --val-attack on")
        options["early_stop"] = args.early_stop
    return options


def model_kwargs(args: argparse.Namespace) -> dict:
    """The zoo model's keywords: the MLP flags that were given, then every --model-arg."""
    kwargs = {key: getattr(args, key) for key in MLP_OPTIONS if getattr(args, key, None) is not None}
    kwargs.update(key_values(args.model_arg, "model-arg"))
    return kwargs
