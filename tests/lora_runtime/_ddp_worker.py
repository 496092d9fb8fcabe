"""torchrun worker for test_train.py::test_two_cpu_ranks_match_one_process: python _ddp_worker.py MODEL SHARDS OUT.
Logs are read a step late as on a GPU (summed over ranks on the device), which a CPU run would not do by itself."""

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

import _runs  # noqa: E402
import lora_runtime.trainer  # noqa: E402
from lora_runtime import lora_sft  # noqa: E402

lora_runtime.trainer.DEFERRED_LOG_DEVICES = ("cuda", "cpu")
_read_later = lora_runtime.trainer.PackedTrainer._read_later
LATE: list[int] = []


def _counted(self, *args):
    LATE.append(self.state.global_step)
    return _read_later(self, *args)


lora_runtime.trainer.PackedTrainer._read_later = _counted

if __name__ == "__main__":
    model, shards, out = sys.argv[1:4]
    # micro 2 × 2 ranks × accum 1 reads the same 4 rows per step as micro 2 × 1 process × accum 2
    lora_sft(model, shards, out, **{**_runs.RUN, "gradient_accumulation_steps": 1})
    print(f"rank {os.environ['RANK']} read late: {LATE}", flush=True)
