"""The step log's process-level duties: the garbage collector frozen after the first step of a process (a resumed
run's too), and given back by finish()."""
import argparse
import gc

import torch

from nanochat import training

def make_log():
    parser = argparse.ArgumentParser()
    training.add_training_flags(parser)
    return training.TrainLog("test", parser.parse_args([]), num_steps=10)

def test_gc_is_frozen_after_the_first_step_of_the_process_and_unfrozen_at_finish():
    gc.unfreeze()
    log = make_log()
    assert gc.get_freeze_count() == 0
    log.step(7, 0.0, 1.0, torch.tensor(2.0), tokens=8)  # a resumed run: its first step here is step 7
    frozen = gc.get_freeze_count()
    assert frozen > 0
    log.step(8, 0.0, 1.0, torch.tensor(2.0), tokens=8)
    assert gc.get_freeze_count() == frozen  # only once: later steps leave it alone
    training.finish(log, None, {})
    assert gc.get_freeze_count() == 0
