"""Data parallelism: two CPU processes (gloo, through accelerate) train the same adapters as one
process with the same global batch.

The test starts this file twice as a worker (`python test_train_parallel.py --worker ...`) with a
torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); each worker builds the tiny
model, takes half of every step's edits, and the gradients are averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
CONFIG = {"text_layer": 2, "visual_layer": 3, "width": 16, "heads": 2}
SETTINGS = {
    "lr": 1e-2,
    "batch_size": 4,
    "max_steps": 4,
    "eval_every": 2,
    "val_edits": 2,
    "eval_batch_size": 2,
    "log_every": 1,
    "checkpoint_every": 2,
    "patience": None,
    "seed": 5,
}
# Float32 sums in another order (two half batches, then an average) after a few Adam steps,
# which divide by the root of tiny second moments and so enlarge rounding: observed
# differences up to 1.4e-6 (one element of 512, 2026-12-02 on this project's CPU machine). A
# wrong split or average moves weights by lr-sized amounts (1e-2), far above this.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def run_training(name: str, data: Path, out_dir: Path, accelerator=None):
    from conftest import TINY_BUILDERS

    from dualedit.data.mmedit import MMEditDataset
    from dualedit.editors.dualedit import train_dualedit
    from dualedit.train import TrainSettings

    model, processor = TINY_BUILDERS[name]()
    return train_dualedit(
        model,
        processor,
        MMEditDataset(data),
        config=CONFIG,
        settings=TrainSettings(**SETTINGS),
        out_dir=out_dir,
        progress=False,
        accelerator=accelerator,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_two_processes_match_one(name, tmp_path):
    from test_train_data import write_tiny_mmedit

    data = write_tiny_mmedit(tmp_path / "data", n=10).path
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            # A CPU test on any machine: with a GPU visible, accelerate's barrier names
            # device LOCAL_RANK, which a one-GPU machine lacks for rank 1.
            "CUDA_VISIBLE_DEVICES": "",
        }
        cmd = [sys.executable, __file__, "--worker", name, str(data), str(tmp_path / "two")]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append(out.decode(errors="replace"))
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    assert "processes=2" in outputs[0] and "rank=1" in outputs[1]

    one = run_training(name, data, tmp_path / "one")
    assert one.steps == SETTINGS["max_steps"]
    two_weights = load_file(str(tmp_path / "two" / "last" / "adapter_model.safetensors"))
    one_weights = load_file(str(tmp_path / "one" / "last" / "adapter_model.safetensors"))
    assert two_weights.keys() == one_weights.keys()
    moved = 0
    for key, value in one_weights.items():
        torch.testing.assert_close(two_weights[key], value, **TOLERANCE, msg=key)
        moved += int(not torch.equal(value, torch.zeros_like(value)) and "out." in key)
    assert moved == 4  # both adapters' output projections trained away from zero
    # The logged losses (averaged over processes) and validation scores (summed over processes)
    # are those of the single process.
    logs = [json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("two", "one")]
    entries = [log["entries"] for log in logs]
    assert [e["kind"] for e in entries[0]] == [e["kind"] for e in entries[1]]
    for a, b in zip(*entries, strict=True):
        for key in ("loss", "l_rel", "l_gen", "l_loc", "score", "m_loc", "t_loc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("data")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    import dualedit.editors.dualedit.heads as heads

    heads.STEPS = 30  # the learned gate heads' fit, short as in every test (conftest.py)

    accelerator = Accelerator(cpu=True)
    result = run_training(args.worker, Path(args.data), Path(args.out_dir), accelerator)
    print(
        f"rank={accelerator.process_index} processes={accelerator.num_processes} "
        f"steps={result.steps}",
        flush=True,
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1:])
