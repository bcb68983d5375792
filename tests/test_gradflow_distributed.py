"""GradientMonitor under DDP (torchrun, 2 gloo processes): every rank's records equal one process's on the whole
batch — gradients are all-reduced by DDP, and the monitor combines the activation and input statistics and the
loss across ranks itself."""
from __future__ import annotations

import json
import textwrap

import pytest

from test_train_distributed import _one_and_two

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from gradguard.data import load_dataset
    from gradguard.diagnostics import GradientMonitor
    from gradguard.models import build_model
    from gradguard.train import Trainer
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    d = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", depth=2, width=32, input_shape=(1, 8, 8))
    monitor = GradientMonitor(model, every=2)
    Trainer(model, "standard", epochs=1, batch_size=100, optimizer="sgd", lr=0.1, progress=False, monitor=monitor,
            seed=0).fit((d.x_train[:1000], d.y_train[:1000]))
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(out, f"records-rank{rank}.json"), "w") as handle:
        json.dump({"distributed": monitor.distributed, "records": monitor.records}, handle)
""")

COMPARED = ("grad_norm", "grad_max", "weight_norm", "update_ratio", "dead_fraction", "input_rms", "input_absmax",
            "loss", "forward_index")


@pytest.mark.slow
def test_ddp_records_equal_one_process(tmp_path):
    single, double = _one_and_two(tmp_path, SCRIPT)
    one = json.loads((single / "records-rank0.json").read_text())
    ranks = [json.loads((double / f"records-rank{r}.json").read_text()) for r in (0, 1)]
    assert one["distributed"] is False and all(rank["distributed"] for rank in ranks)
    assert len(one["records"]) == len(ranks[0]["records"]) == len(ranks[1]["records"]) > 0
    for single, *shards in zip(one["records"], ranks[0]["records"], ranks[1]["records"], strict=True):
        assert single["layer"] == shards[0]["layer"] == shards[1]["layer"]  # no "module." prefix under DDP
        for key in COMPARED:
            for shard in shards:
                if single.get(key) is None:
                    assert shard.get(key) is None, key
                else:
                    assert shard[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (key, single["step"])
    assert any(r["dead_fraction"] for r in one["records"])  # the activation statistics were really compared
    assert any(r.get("input_rms") for r in one["records"]) and any(r["loss"] for r in one["records"])
