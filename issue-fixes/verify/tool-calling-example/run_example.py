"""Runs the example's main() with a training time budget, for the device call's time limit.

    python3 run_example.py EXAMPLE.py SECONDS [example arguments...]

A TrainerCallback stops training once SECONDS have passed since the first step, so the
after-training evaluation and metrics.json still happen inside the call; metrics.json's
`steps_done` then says how far it got (the learning-rate schedule was set for `max_steps`).
The example itself is unchanged: SFTTrainer is wrapped after Unsloth has patched TRL.
"""

import importlib.util
import sys
import time

path, budget, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

import unsloth  # noqa: F401  (first, as in the example)
import transformers
import trl


class _Budget(transformers.TrainerCallback):
    start = None

    def on_step_end(self, args, state, control, **kwargs):
        self.start = self.start or time.time()
        if time.time() - self.start > budget:
            print(f"run_example: training stopped at step {state.global_step}, {budget:.0f} s budget spent")
            control.should_training_stop = True


# Unsloth replaces trl.SFTTrainer when imported; wrap that one, never TRL's own.
print(f"run_example: trl.SFTTrainer is {trl.SFTTrainer.__module__}.{trl.SFTTrainer.__name__}")
if unsloth.__version__ != "cpu-shim":
    assert trl.SFTTrainer.__name__.startswith("Unsloth"), "unsloth did not patch trl.SFTTrainer"


class _SFTTrainer(trl.SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_Budget())


trl.SFTTrainer = _SFTTrainer
spec = importlib.util.spec_from_file_location("train_tool_calling", path)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
example.main(argv)
