"""Scale-out: evaluate() under torchrun (2 processes, gloo on CPU) shards the samples and reports exactly what one
process reports — same per-sample results, same numbers, same adversarial points — on every rank, from tensors,
a DataLoader or a map-style dataset (of which each rank reads only its own blocks); per-rank journals resume in
one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from cli_helpers import DIGITS_MLP_SOURCE

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, torch
    from torch import nn
    torch.set_num_threads(1)
    from gradguard import Linf, evaluate, evaluate_curve
    from gradguard.attacks import Attack, Iterate
    from gradguard.data import load_dataset
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    class Counted(Dataset):
        def __init__(self, x, y):
            self.x, self.y, self.read = x, y, 0
        def __len__(self):
            return len(self.y)
        def get_batch(self, index):
            self.read += len(index)
            return self.x[index.start:index.stop], self.y[index.start:index.stop]

    def outcome(report):
        result = report.to_dict()
        for key in ("elapsed_s", "attack_time_s", "world_size", "attacks", "elapsed_parts_s"):
            result.pop(key)
        return result

    class Recorder(Attack):
        name = "recorder"
        def __init__(self, model, threat):
            super().__init__(model, threat)
            self.seen = 0
        def _perturb(self, x, labels):
            self.seen += x.shape[0]
            return Iterate(x.clone())

    out = sys.argv[1]
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
""") + DIGITS_MLP_SOURCE + textwrap.dedent("""
    model.eval()
    data = (d.x_test[:170], d.y_test[:170])
    recorder = Recorder(model, Linf(0.1))
    suite = ["fgsm", {"name": "pgd", "steps": 5, "restarts": 2}, recorder]
    report = evaluate(model, data, Linf(0.1), suite, batch_size=16, seed=7, return_adversarial=True)
    curve = evaluate_curve(model, data, Linf(0.1), [0.02, 0.05, 0.1], suite=["fgsm", {"name": "pgd", "steps": 5}],
                           batch_size=16, seed=7)
    result = outcome(report)
    streamed_suite = ["fgsm", {"name": "pgd", "steps": 5, "restarts": 2}]
    streamed = evaluate(model, DataLoader(TensorDataset(*data), batch_size=7), Linf(0.1), streamed_suite,
                        batch_size=16, seed=7, journal=os.path.join(out, "journal.jsonl"))
    dataset = Counted(*data)
    indexed = evaluate(model, dataset, Linf(0.1), streamed_suite, batch_size=16, seed=7)
    resumed, resumed_read = None, 0
    if len(sys.argv) > 2:  # resume from another run's journals (another world size)
        resumed_data = Counted(*data)
        resumed = outcome(evaluate(model, resumed_data, Linf(0.1), streamed_suite, batch_size=16, seed=7,
                                   journal=sys.argv[2], resume=True))
        resumed_read = resumed_data.read
    curve_result = curve.to_dict()
    curve_result.pop("elapsed_s")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"report": result, "curve": curve_result, "world_size": report.world_size,
                   "streamed": outcome(streamed), "indexed": outcome(indexed), "indexed_read": dataset.read,
                   "resumed": resumed, "resumed_read": resumed_read,
                   "seen": recorder.seen, "x_adv": hashlib.sha256(report.x_adv.numpy().tobytes()).hexdigest()},
                  handle)
    if torch.distributed.is_initialized():  # a clean shutdown: no gloo thread left running at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


def _launch(script, out, processes: int, *extra: str) -> None:
    out.mkdir()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-6000:]


def test_two_process_evaluation_equals_one_process(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT)
    _launch(script, tmp_path / "two", 2)
    _launch(script, tmp_path / "one", 1, str(tmp_path / "two" / "journal.jsonl"))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert one["world_size"] == 1 and two[0]["world_size"] == two[1]["world_size"] == 2
    for rank in two:  # identical report on every rank, identical to one process, down to each sample
        assert rank["report"] == one["report"]
        assert rank["curve"] == one["curve"]
        assert rank["x_adv"] == one["x_adv"]
    # The work was really split: each rank attacked part of the survivors, together all of them.
    assert 0 < two[0]["seen"] < one["seen"] and two[0]["seen"] + two[1]["seen"] == one["seen"]
    report = one["report"]
    assert 0 < report["robust_accuracy"] < report["clean_accuracy"]  # a non-trivial case
    assert report["n_samples"] == 170

    # Streamed data: identical on every rank and in one process, whatever the form.
    assert one["streamed"] == one["indexed"] and one["streamed"]["n_samples"] == 170
    for rank in two:
        assert rank["streamed"] == rank["indexed"] == one["streamed"]
    # 11 blocks of 16: each rank reads its own blocks, plus block 0 for the cheap same-data check.
    assert [rank["indexed_read"] for rank in two] == [5 * 16 + 10, 16 + 5 * 16]
    assert one["indexed_read"] == 170
    # The two ranks' journals (journal.jsonl.rank0/1) resume in one process: nothing left to do but read block 0.
    assert one["resumed"] == one["streamed"] and one["resumed_read"] == 16
