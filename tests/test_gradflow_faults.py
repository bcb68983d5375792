"""The fault benchmark's smallest run (bench/diagnostics_faults.py): every planted fault is found, no healthy run
raises anything (at the end or on the way), and the depth order ignores containers that own parameters (a ViT's position embedding)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradguard.diagnostics.gradflow import GradientMonitor, findings_from_records

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def faults():
    sys.path.insert(0, str(BENCH))
    try:
        import diagnostics_faults
    finally:
        sys.path.remove(str(BENCH))
    return diagnostics_faults


@pytest.mark.parametrize("family", ["mlp", "transformer", "cnn"])
def test_every_planted_fault_is_found_and_healthy_runs_stay_quiet(faults, tmp_path, family):
    out = tmp_path / "faults.json"
    # --threads: the benchmark sets torch's thread count; keep this process's, which later tests rely on
    assert faults.main(["--quick", "--families", family, "--steps", "30", "--threads", str(torch.get_num_threads()),
                        "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    planted = {name for name, s in faults.scenarios(family).items() if s.fault}
    assert len(planted) >= 8  # every fault kind of the issue: exploding on the MLP and ViT, not_learning on the CNN
    for run in result["runs"]:
        if run["fault"] is None:
            assert run["kinds"] == [], f"false alarm on {run['scenario']}: {run['findings']}"
            assert run["first_step"] == {}, f"false alarm on {run['scenario']} during the run: {run['first_step']}"
        else:
            assert run["detected"], f"{run['scenario']} missed: raised {run['kinds']}"
            assert run["first_step"][run["fault"]] <= 30
    assert result["summary"]["healthy"]["false_alarm_rate"] == 0.0


class PositionalNet(nn.Module):
    """A container owning a parameter it uses after its children's first layer (like a ViT's position
    embedding), in front of a deep sigmoid stack: the first *leaf* layer is where gradients vanish."""

    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(16))
        self.embed = nn.Linear(16, 16)
        self.stack = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.stack(self.embed(x) + self.position))


def test_depth_order_skips_containers_that_own_parameters():
    torch.manual_seed(0)
    model = PositionalNet()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16) * 3, torch.randint(0, 3, (64,))
    with GradientMonitor(model, every=1, optimizer=optimiser) as monitor:
        for _ in range(10):
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            monitor.step(loss)
    root = [r for r in monitor.records if r["layer"] == "PositionalNet"]
    assert root and all(r["forward_index"] is None for r in root)
    embed = [r for r in monitor.records if r["layer"] == "embed"]
    assert all(r["forward_index"] == 0 for r in embed)
    assert embed[0]["input_rms"] == pytest.approx(float(x.square().mean().sqrt()), rel=1e-5)
    vanishing = [f for f in findings_from_records(monitor.records) if f.kind == "vanishing"]
    assert vanishing and vanishing[0].evidence["first_layer"] == "embed"
    assert vanishing[0].evidence["last_layer"] == "head"


def _overflow_records(norms: list[float], losses: list[float], *, input_nan: bool = False) -> list[dict]:
    """One-layer records whose last sample has a NaN gradient (and, optionally, a NaN input)."""
    records = []
    for step, (norm, loss) in enumerate(zip(norms + [float("nan")], losses + [float("nan")], strict=True)):
        bad = step == len(norms)
        records.append({"step": step, "layer": "a", "index": 0, "forward_index": 0, "numel": 1,
                        "grad_norm": None if bad else norm, "grad_finite": not bad, "weight_norm": 1.0,
                        "weight_finite": True, "update_ratio": 1e-3, "update_norm": 1e-3,
                        "loss": None if bad else loss, "loss_finite": not bad,
                        "input_finite": not (bad and input_nan)})
    return records


def test_an_explosion_that_overflows_between_samples_is_exploding():
    growing = [1.0, 1.0, 1.0, 3.0, 12.0, 60.0]  # 60x, below the 1e3 growth rule, then NaN
    rising, falling = [2.3, 2.3, 2.3, 2.5, 3.0, 4.0], [2.3, 2.3, 2.2, 1.5, 1.2, 1.0]
    assert {f.kind for f in findings_from_records(_overflow_records(growing, rising))} == {"nonfinite", "exploding"}
    # a NaN in a run that was learning (loss falling), or coming from the input, is not an explosion
    assert {f.kind for f in findings_from_records(_overflow_records(growing, falling))} == {"nonfinite"}
    assert {f.kind for f in findings_from_records(_overflow_records(growing, rising, input_nan=True))} == {"nonfinite"}
    # nor is a NaN after a gradient that stayed put
    assert {f.kind for f in findings_from_records(_overflow_records([1.0] * 6, rising))} == {"nonfinite"}
