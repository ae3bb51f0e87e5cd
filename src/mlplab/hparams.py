"""The HParams tab: one session per run, written beside the run's own event files.

Each successful run writes its session into `<run dir>/hparams/` (a TensorBoard run of its own):
the session start info (the run's config as typed values) and the metric columns as scalars,
all at the optimiser step of the checkpoint that was tested. No run or sweep writes an
HParams *experiment*. How TensorBoard's hparams plugin (2.21, backend_context.py) builds the
tab decides this:

- If any run under the logdir holds an experiment summary, it takes the first one it finds
  ("arbitrarily pick the first one") as the columns of every session under the logdir, with
  that experiment's value domains as the filters. One experiment per job, as before, showed
  one job's keys; one per sweep would do the same to `tensorboard --logdir outputs` over
  several sweeps: the columns and filters of one sweep, other sweeps' keys missing and their
  string values filtered out.
- Without one, it computes the experiment from every session under the logdir: the union of
  their keys; each key's type from its values; strings and booleans with their distinct values
  (a filter of checkboxes), numbers with their range; `differs` where the values are not all
  equal. The keys that differ come first (then by name), and the page ticks the first five.
  The metric columns are the scalar tags of the session runs (and their subfolders): hence a
  folder of its own holding only the columns below, not the run dir with its dozens of curves.

So one experiment per logdir, whatever the logdir holds: a run, a sweep, or `outputs/` with
every run and sweep in it; a sweep's swept keys are the keys that differ, and lead.

What a session holds (`hparams_of`): the group choices under their group's name
(`activation: softplus`) and the resolved config flattened to `activation/beta`-style keys,
without Hydra and Lightning plumbing (`_target_`, `_partial_`), local paths and settings that
change how a run is shown or placed but not its results (`NOT_HPARAMS`), and without keys whose
value is `${another.key}` (they would repeat that key's column, and in a sweep over `seed`
`data/shuffle_seed: ${seed}` would differ too). Values keep their types, as far as
TensorBoard's table can show them: booleans as booleans, floats as numbers, nulls left out
(an empty cell), lists as text, and integers as text: the table prints every number to five
significant digits (seed 1 reads "1.0000"), while text keeps "1" and gets a filter of checkboxes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch.utils.tensorboard.summary import scalar
from torch.utils.tensorboard.writer import FileWriter

from mlplab.record import EpochHistory

SESSION_DIR = "hparams"  # <run dir>/hparams/: the session and its metric columns
# The metric columns copied from metrics.json ("metrics"), all describing the tested checkpoint or the whole run.
# A new column is one more name here, once run() records it in metrics.json.
METRICS = ("test/acc", "test/loss", "val/acc_best")
# Columns read off history.json at the tested checkpoint's step, named "<name>_tested": metrics.json's own
# "val/acc" is the last epoch's, which is not the checkpoint the test used.
TESTED = ("val/acc",)
# Config keys left out of the sessions (still in resolved_config.yaml): where the run writes and reads (paths),
# how it is shown and how many threads it gets (no effect on its results), and the logger and callbacks.
NOT_HPARAMS = frozenset({"output_dir", "ckpt_path", "data/root", "torch_threads", "callbacks", "logger",
                         "trainer/enable_progress_bar", "trainer/enable_model_summary"})
PLUMBING = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})  # Hydra's instantiate keys
_KEY_REFERENCE = re.compile(r"\$\{[\w.]+\}")  # "${seed}": another key's value, not a resolver's ("${oc.env:...}")


def hparams_of(cfg: DictConfig, choices: dict[str, str]) -> dict[str, bool | float | str]:
    """The session's values: group choices and the flattened config, typed for the HParams table.

    Args:
        cfg: the composed config (unresolved: interpolations are told apart from values).
        choices: Hydra's group choices, e.g. {"activation": "softplus", "data": "mnist"}.

    Returns:
        name -> value, e.g. {"activation": "softplus", "activation/beta": 1.0, "seed": "0",
        "model/hidden_sizes": "[200, 200]", "data/normalize": True}.
    """
    values: dict[str, Any] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key, text in OmegaConf.to_container(node, resolve=False).items():  # interpolations as "${...}" text
            name = f"{prefix}{key}"
            if key in PLUMBING or name in NOT_HPARAMS or (isinstance(text, str) and _KEY_REFERENCE.fullmatch(text)):
                continue
            value = node[key]  # resolved
            if isinstance(value, DictConfig):
                walk(value, f"{name}/")
            else:
                values[name] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value

    walk(cfg, "")
    values.update(choices)  # a choice under its group's name: "activation" next to "activation/beta"
    return {name: typed for name, value in values.items() if (typed := _table_value(value)) is not None}


def _table_value(value: Any) -> bool | float | str | None:
    """A config value as the HParams table shows it well (see the module docstring); None: leave it out."""
    if value is None or isinstance(value, (bool, float, str)):
        return value
    return str(value)  # integers and lists


def tested_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
    """The metric columns of a tested run and the optimiser step they describe.

    Args:
        trainer: after trainer.test(); its "step" is the x of the test scalars, the tested checkpoint's step
            (Classifier.tested_step).
        metrics: the run's final metrics, as in metrics.json.

    Returns:
        (step, {name: value}) for the names of METRICS that the run recorded, and "<name>_tested" for those
        of TESTED that the history holds at that step.
    """
    step = int(trainer.callback_metrics["step"])
    columns = {name: metrics[name] for name in METRICS if name in metrics}
    history = next((c.rows for c in trainer.callbacks if isinstance(c, EpochHistory)), [])
    row = next((row for row in history if row.get("step") == step), {})
    columns.update({f"{name}_tested": row[name] for name in TESTED if row.get(name) is not None})
    return step, columns


def log_session(trainer: L.Trainer, params: dict[str, bool | float | str], metrics: dict[str, float]) -> None:
    """Writes the run's HParams session into <log dir>/hparams/ (nothing without a TensorBoard logger).

    The session is named by its folder: TensorBoard's Trial ID column then reads e.g.
    "0_activation=relu,seed=0/hparams", unique under any logdir.

    Args:
        trainer: a trainer whose test has run.
        params: hparams_of(...).
        metrics: the run's final metrics, as in metrics.json.
    """
    if not isinstance(trainer.logger, TensorBoardLogger):
        return
    step, columns = tested_metrics(trainer, metrics)
    # tensorboard.plugins.hparams.summary.session_end_pb imports TensorFlow: the same summary, built the way
    # summary_v2.hparams_pb builds the start info
    end = Summary()
    end.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                  metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                      session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS,
                                                                      end_time_secs=time.time()))))
    writer = FileWriter(str(Path(trainer.logger.log_dir) / SESSION_DIR))
    writer.add_summary(hparams_pb(params, trial_id=""))  # "": the session is a group of its own, named by its folder
    for name, value in columns.items():
        writer.add_summary(scalar(name, value), step)
    writer.add_summary(end)
    writer.close()
