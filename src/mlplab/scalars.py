"""Scalars the kit adds to TensorBoard beside the module's metrics, so that steps read as epochs."""

from __future__ import annotations

import lightning as L


class EpochScalars(L.Callback):
    """Logs, when each training epoch ends (its validation done), against the optimiser step:

    - `epoch`: the epoch just finished, counted from 0 as in history.json (TensorBoard's x is the step);
    - `<monitor>_best` (e.g. val/acc_best): the best monitored value so far, this epoch's included: the
      score of the checkpoint the test will use if training stopped here.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = {"epoch": trainer.current_epoch}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.monitor in trainer.callback_metrics:
            # ModelCheckpoint compares this epoch's value after this hook (Lightning runs checkpoint callbacks
            # last), so its best_model_score is still the best of the earlier epochs (None after the first)
            current = float(trainer.callback_metrics[checkpoint.monitor])
            earlier = checkpoint.best_model_score
            better = max if checkpoint.mode == "max" else min
            values[f"{checkpoint.monitor}_best"] = current if earlier is None else better(current, float(earlier))
        for logger in trainer.loggers:  # each logger writes on global rank 0 only
            logger.log_metrics(values, step=trainer.global_step)
