"""Prints the training step time (steps STEP_WINDOW="first,last") and each epoch's wall time and metrics."""
import time

import lightning as L
import torch


class StepTimer(L.Callback):
    def __init__(self) -> None:
        import os
        self.first, self.last = (int(x) for x in os.environ.get("STEP_WINDOW", "30,110").split(","))
        self.t = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in (self.first, self.last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t[step] = time.perf_counter()
            if step == self.last:
                print(f"STEP_SECONDS {(self.t[self.last] - self.t[self.first]) / (self.last - self.first):.5f}",
                      flush=True)

    def on_train_start(self, trainer, module):
        print(f"TRAIN_BATCHES {trainer.num_training_batches}", flush=True)

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(f"EPOCH {trainer.current_epoch} {time.perf_counter() - self.epoch_start:.1f}s {metrics}", flush=True)
