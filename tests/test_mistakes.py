"""Issue #14, case 6: a user's mistake ends in one `error:` line naming the key or file and the fix, before
training, without a traceback; and a property test over overrides of every config group."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import CONF, ROOT, TINY, compose_config, run_cli, run_script
from mlplab.idx import IDX_FILES
from mlplab.train import EXPECTED_ERRORS, run


@pytest.fixture
def own_data(data_root, tmp_path) -> Path:
    """A copy of the synthetic data that a test may spoil."""
    return Path(shutil.copytree(data_root, tmp_path / "data"))


def test_a_label_out_of_range_is_named_with_its_file_when_loading(own_data, tmp_path):
    labels = own_data / "MNIST" / "raw" / IDX_FILES["train"]["labels"]
    data = bytearray(labels.read_bytes())
    data[8 + 7] = 200  # item 7 (after the 8-byte header)
    labels.write_bytes(bytes(data))
    with pytest.raises(EXPECTED_ERRORS, match=rf"^{labels} holds label 200 at item 7, but mnist has 10 classes "
                                              r"\(labels 0 to 9\): the file is corrupt"):
        run(compose_config([], tmp_path / "run", own_data))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_where_an_idx_file_should_be_is_named_and_nothing_is_downloaded(own_data, tmp_path):
    images = own_data / "MNIST" / "raw" / IDX_FILES["test"]["images"]
    images.unlink()
    images.mkdir()
    with pytest.raises(EXPECTED_ERRORS, match=rf"^{images} is a folder, not an IDX file"):
        run(compose_config([], tmp_path / "run", own_data))


def test_evaluate_script_on_a_text_file_or_a_folder_is_one_error_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    result = run_script(ROOT / "scripts" / "evaluate.py", [text], tmp_path, dict(os.environ), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: {text} is not a readable checkpoint (UnpicklingError: "
        + result.stderr.split("(UnpicklingError: ", 1)[1].strip()]
    assert "Traceback" not in result.stderr
    # a run folder: the hint is the file itself, as the script takes it (a positional argument)
    result = run_script(ROOT / "scripts" / "evaluate.py", [tmp_path], tmp_path, dict(os.environ), timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is a folder, not a checkpoint file. Give the file, e.g. {tmp_path}/checkpoints/last.ckpt"]


# ------------------------------------------------------------------ property: every group, any override

def group_choices(group: str) -> list[str]:
    found = sorted(p.stem for p in (CONF / group).rglob("*.yaml"))
    assert found, group
    return found


# Values that are right, wrong in range, wrong in type, or not a key at all, for keys of every group.
VALUES = {
    "seed": ["0", "-1", "abc", "1e20"], "torch_threads": ["1", "0", "null"], "monitor": ["val/loss", "val/bogus"],
    "ckpt_path": ["/nonexistent.ckpt"], "trainer.gradient_clip_val": ["1.0", "-1"],
    "optimizer.lr": ["0.01", "0", "inf", "abc"], "data.batch_size": ["7", "0", "null"], "data.val_size": ["100", "0"],
    "data.normalize": ["false"], "model.hidden_sizes": ["[8]", "[]", "null", "[0]", "abc"], "model.dropout": ["0.5", "2"],
    "model.init": ["xavier", "bogus"], "scheduler.gamma": ["0.5"], "scheduler.step_size": ["0", "1"],
    "trainer.max_epochs": ["0", "abc"], "loss.delta": ["0"], "data.bogus": ["1"],
}
# The CPU trainers only: trainer=gpu/ddp need a GPU (test_distributed.py), ddp_cpu starts processes of its own.
# (debug is TINY's, debug=tiny; experiment and hparams_search set many keys at once and have tests of their own.)
TRAINERS = [t for t in group_choices("trainer") if t in ("cpu", "default")]

OVERRIDES = st.tuples(
    st.fixed_dictionaries({group: st.sampled_from(group_choices(group)) for group in
                           ("data", "model", "activation", "loss", "optimizer")}
                          | {group: st.sampled_from(group_choices(group)) for group in ("scheduler", "callbacks", "logger")}
                          | {"trainer": st.sampled_from(TRAINERS)}),
    st.dictionaries(st.sampled_from(sorted(VALUES)), st.just(None), max_size=2).flatmap(
        lambda keys: st.tuples(*(st.sampled_from([f"{k}={v}" for v in VALUES[k]]) for k in keys))),
).map(lambda pair: [f"{k}={v}" for k, v in pair[0].items()] + list(pair[1]))


@pytest.fixture(scope="module")
def startup_s(data_root, tmp_path_factory) -> float:
    """Seconds `python train.py` takes to compose its config and stop at a config error: one start-up."""
    cwd = tmp_path_factory.mktemp("startup")
    start = time.perf_counter()
    result = run_cli([*TINY, "seed=-1", f"hydra.run.dir={cwd / 'run'}"], data_root, cwd=cwd)
    assert result.returncode != 0 and "error: seed=-1" in result.stderr
    return time.perf_counter() - start


@settings(max_examples=4, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],  # no shrinking: a
          # failing example is printed as drawn (each one is a start-up of train.py)
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=OVERRIDES)
def test_any_overrides_run_or_end_in_one_clear_message_within_a_startup(overrides, startup_s, data_root,
                                                                      tmp_path_factory):
    cwd = tmp_path_factory.mktemp("prop")
    start = time.perf_counter()
    tiny = [a for a in TINY if a != "trainer=cpu"]  # the trainer is one of the drawn groups
    result = run_cli([*tiny, "trainer.limit_train_batches=1", *overrides, f"hydra.run.dir={cwd / 'run'}"], data_root,
                     cwd=cwd)
    elapsed = time.perf_counter() - start
    assert "Traceback" not in result.stderr, (overrides, result.stderr)
    if result.returncode == 0:
        return
    last = result.stderr.strip().splitlines()[-1]
    hydra_message = "Set the environment variable HYDRA_FULL_ERROR=1" in last
    assert last.startswith("error: ") or hydra_message, (overrides, result.stderr)
    # failed before training: no longer than a few start-ups on this shared machine
    assert elapsed < 3 * startup_s + 10, (overrides, elapsed, startup_s)
