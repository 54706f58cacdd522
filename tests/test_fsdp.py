"""FSDP2 with two processes (gloo on CPU) against one process: same losses, a final/ that loads in
plain transformers with the same weights, and an exact resume from a sharded run's checkpoint.

accelerate applies FSDP only on GPUs, so on CPU the runs go through tests/fsdp_cpu.py, which sets
accelerate's state to FSDP before alignkit starts (see its docstring); on a machine with two GPUs the
same runs use `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` instead.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.train.loop import read_metrics

from .test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def common(model, data) -> list[str]:
    return ["--model.name-or-path", str(model), "--data.dataset", str(data), "--data.eval-split", "test",
            "--train.eval-steps", "3", "--train.max-steps", "4", "--train.logging-steps", "1", "--train.save-steps", "2",
            "--train.precision", "fp32", "--train.learning-rate", "3e-3", "--quiet"]


def fsdp_sft(args: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "ALIGNKIT_TEST_HANG_S": "1200"}  # generous: a loaded 2-core machine
    if TWO_GPUS:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"),
                  "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "alignkit.cli"]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port()), str(ROOT / "tests" / "fsdp_cpu.py")]
    return subprocess.run(["nice", "-n", "10", *launch, "sft", *args], capture_output=True, text=True, timeout=1500, env=env)


def weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()}


@pytest.mark.slow  # three runs, two with two processes: 756 s on 2 cores at load average ~28 (2026-12-07)
def test_fsdp2_two_processes_match_one_and_resume_exactly(tmp_path, tiny_model_dir, toy_data_dir):
    args = common(tiny_model_dir, toy_data_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", *args, "--output-dir", str(one), "--train.batch-size", "4",
                          "--train.grad-accum", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res = fsdp_sft([*args, "--output-dir", str(two), "--train.batch-size", "4", "--train.grad-accum", "1"])
    assert res.returncode == 0, res.stderr[-5000:]

    # Same global batch split over two processes with sharded weights: the same losses, up to float
    # summation order (FSDP reduce-scatters gradients instead of all-reducing them).
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3, 4, 4]
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss", "tokens_seen", "lr", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), key
    # final/ and each checkpoint are whole HF models (gathered from the shards), loadable by plain transformers
    w1, w2 = weights(one / "final"), weights(two / "final")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    step2 = weights(two / "checkpoints" / "step-2")
    assert any(not torch.equal(step2[k], w2[k]) for k in w2)  # a real intermediate state, not final/'s weights
    assert sorted(p.name for p in (two / "checkpoints" / "step-2").glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]

    # Killed after step 2 (its later checkpoint and final/ never written): --resume continues exactly.
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    res = fsdp_sft([*args, "--output-dir", str(cut), "--train.batch-size", "4", "--train.grad-accum", "1", "--resume"])
    assert res.returncode == 0, res.stderr[-5000:]
    assert read_metrics(cut) == [{**r, "tokens_per_s": c["tokens_per_s"]} if "tokens_per_s" in r else r
                                 for r, c in zip(read_metrics(two), read_metrics(cut))]
    w3 = weights(cut / "final")
    assert all(torch.equal(w3[k], w2[k]) for k in w2)
