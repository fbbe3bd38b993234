"""Run ``dft`` with a fault injected in the middle of writing a checkpoint (tests only).

``DFT_TEST_CRASH_AT_STEP=N`` makes rank 0 die (``os._exit``) inside ``engine.save`` of the checkpoint
at step ``N``, after the engine wrote its shards into the staging directory and before the checkpoint
manager writes the run state and renames it: the state a power cut or an OOM kill would leave.

Usage: ``torchrun --nproc_per_node 2 crash_in_save.py train CONFIG key=value ...``
"""

from __future__ import annotations

import os
import sys

from distributed_ft.cli import main

CRASH_EXIT_CODE = 17


def _install_fault(step: int) -> None:
    from distributed_ft.engine import deepspeed_engine, torch_engine

    for cls in (deepspeed_engine.DeepSpeedEngine, torch_engine.TorchEngine):
        original = cls.save

        def save(self, directory, _original=original):
            _original(self, directory)
            if directory.name.endswith(f"step-{step:07d}") and self.context.is_main:
                sys.stderr.write(f"crash_in_save: simulated crash while writing {directory}\n")
                sys.stderr.flush()
                os._exit(CRASH_EXIT_CODE)

        cls.save = save


if __name__ == "__main__":
    if "DFT_TEST_CRASH_AT_STEP" in os.environ:
        _install_fault(int(os.environ["DFT_TEST_CRASH_AT_STEP"]))
    sys.exit(main(sys.argv[1:]))
