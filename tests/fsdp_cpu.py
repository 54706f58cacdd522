"""Run `alignkit.cli` under FSDP2 on CPU (gloo), for tests: `torchrun ... tests/fsdp_cpu.py sft ...`.

accelerate applies FSDP only on accelerators: on a CPU-only machine its state stays MULTI_CPU (plain
data parallel) whatever the config says. torch's `fully_shard` itself runs on CPU with gloo, so this
launcher sets accelerate's state to FSDP before alignkit builds its Accelerator; from there the run
takes the same code path as on GPUs (accelerate's fsdp2_prepare_model, sharded DTensor parameters and
optimizer state, gathered state dicts). The FSDP settings come from the environment, as
`accelerate launch --config_file recipes/accelerate/fsdp2.yaml` sets them.
"""

import os
import sys

from accelerate import state as accelerate_state
from accelerate.utils import DistributedType

_init = accelerate_state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both states: each later AcceleratorState() copies PartialState's fields back in.
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


FSDP2_ENV = {  # what `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` exports
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_ACTIVATION_CHECKPOINTING": "false",
}

if __name__ == "__main__":
    if os.environ.get("ALIGNKIT_TEST_HANG_S"):  # a hung collective: print every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ALIGNKIT_TEST_HANG_S"]), exit=True)
    for key, value in FSDP2_ENV.items():
        os.environ.setdefault(key, value)
    accelerate_state.AcceleratorState.__init__ = _fsdp_on_cpu
    from alignkit.cli import main

    sys.exit(main(sys.argv[1:]))
