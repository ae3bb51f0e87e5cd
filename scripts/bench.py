"""Benchmark the kit against a plain-PyTorch floor and the classic tutorial loop (issues #4, #13).

    python scripts/bench.py                                # MLP, MNIST, batch 200, CPU, 3 rounds, 10 epochs
    python scripts/bench.py --batch-size 64                # the same at batch 64
    python scripts/bench.py --dataset fashion_mnist --model softmax_regression --device cuda
    python scripts/bench.py --quick                        # CI: 1 round of 2 epochs of 64 batches (one Lightning batch)
    python scripts/bench.py --side-by-side --threads 1 --variants floor kit   # the variants at once, 1 core each
    python scripts/bench.py --paired --batch-size 64          # each kit epoch beside a floor epoch, one process

Three variants train the same model (same init, same SGD and cosine schedule from conf/, same
batch size, same torch threads) on the same data, and evaluate on val after every epoch and on
test at the end:
    floor    plain PyTorch on preloaded normalised tensors, shuffled by randperm and cut in slices;
    kit      `python train.py ...`: Hydra + Lightning with TensorBoard, checkpoints, figures and
             history on, as a user runs it (only the progress bar off): the default fast path,
             data.steps_per_call optimiser steps per Lightning batch (mlplab.fast_path);
    textbook the same with data.steps_per_call=1: Lightning's automatic optimisation, one batch
             per training_step (mlplab.module.Classifier);
    classic  the tutorial loop: torchvision dataset + DataLoader + per-sample ToTensor/Normalize.
Each run is its own process, started by this script, so imports, start-up and peak RSS are per
variant, and each keeps its freed memory for the next step (mlplab.allocator: the kit's run() and the
floor and classic children call it alike). Rounds are interleaved (floor kit classic floor kit classic
...) so that a noisy machine slows all variants alike, and one more floor run closes the last round, so
that every run lies between two floor runs: a ratio to the floor divides by the geometric mean of the
two, which cancels a speed that drifts steadily through the benchmark. On a machine whose speed drifts
within a run (a shared VM: epochs of one process were seen to vary 2x over tens of seconds), --side-by-side starts a
round's variants at the same moment instead, each on its own cores (variants x --threads <= cores), so
that each round's ratios compare epochs run under the same conditions; the kit starts its first epoch a
few seconds after the floor (its imports), and runs its last ones after the floor has ended.
--paired goes further: the kit alone, each of its training epochs preceded by a plain-PyTorch epoch
in the same process over the same tensors (`paired_floor`), seconds apart, without start-up; one ratio
compares the training steps only, the other the whole epoch (the floor's val pass beside the kit's val
pass, checkpoints, diagnostics and history: epoch s below). Per variant, the medians over rounds of:
    epoch s       one training epoch plus its val pass (the kit's also its checkpoints, histograms and
                  history), median over the epochs after the first
    epoch cpu s   the same epochs in CPU seconds of the process, all threads: with --threads 1 the
                  steadier measure on a machine that other work keeps busy
    first step s  from just before the process was started to the first training step (its batch in
                  hand, marked just before its forward)
    wall s        the whole process: start-up, data, all epochs, test, writing results, exit
    cpu s         the whole process in CPU seconds (os.wait4)
    peak RSS MB   the process's maximum resident set (os.wait4), in 10^6 bytes
    val s         one val pass (median over the epochs after the first): the kit's whole val loop
                  (batches, metrics, logging; not the checkpoints it triggers), the others' a no-grad
                  forward + loss + accuracy over the same tensors
    test s        the test pass, measured as val s; the kit's without its figures, which are
    figures s     the kit's test figures (misclassified grid, confusion matrix, entropy histogram),
                  drawn and written to TensorBoard
    diag s        train.py's per-layer diagnostics at each epoch's end (mlplab.diagnostics, part of
                  epoch s), median over the epochs after the first; printed as a share of the epoch
                  too, in wall and CPU seconds (issue #17's bound: 3%)
    record s      all that train.py records each epoch and the floor does not, part of epoch s: its
                  checkpoints (ModelCheckpoint's save hooks), diagnostics, parameter histograms and
                  history.json; printed part by part below the table, and as a share of the epoch
    test acc      of the final weights; the kit's of its best checkpoint (by val/acc)
and the ratios kit/floor and classic/kit, each the median of the per-round ratios, and "kit/floor
epoch less recording": the kit's epochs less their record s, to the floor's (its loop, Lightning's
per-batch and val work, and the process it runs in, without what it writes). The table is
printed with the machine's load average, and written as JSON (--json) with every run's record.
The kit's marks come from a callback added to train.py with
`+callbacks.epoch_timer={_target_: bench.epoch_timer, ...}` (one more callback in Lightning's
per-step hook calls: a few microseconds a step); the floor and classic children run this file
with --child. Torch and friends are imported inside the child functions only, so that each child
pays for its own imports, and the kit's import of this file for its callback adds nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("floor", "kit", "textbook", "classic")
KIT_VARIANTS = {"kit": [], "textbook": ["data.steps_per_call=1"]}  # train.py runs, with their overrides
PAIRED = ("train", "whole")  # --paired's two comparisons (paired_floor)
# What the kit records every epoch and the floor does not, timed in its epoch_timer callback
RECORDING = ("checkpoints", "diagnostics", "histograms", "history")
QUICK_EPOCHS, QUICK_BATCHES = 2, 64  # --quick: the second epoch gives one epoch time after the first; 64: one call at conf/data's steps_per_call
# issue #4's targets for the default MLP at batch 200 and 64 on a 2-core CPU (printed, never enforced)
TARGETS = {"kit/floor epoch": 1.10, "kit first step s": 3.0, "kit wall s": 20.0, "kit peak RSS MB": 1200.0,
           "kit/floor val": 1.2, "kit/floor test": 1.2,
           "kit diagnostics/epoch": 0.03, "kit diagnostics/epoch cpu": 0.03}  # issue #17's bound


class Clock:
    """Marks of one run in seconds since its process was started, written as JSON at the end.

    Args:
        start: time.time() taken by this script just before it started the process.
        sync: waits for the device (torch.cuda.synchronize on a GPU) before each mark, so that a
            mark comes after the work queued before it; called at marks only, never per step.
    """

    def __init__(self, start: float, sync: Callable[[], None]) -> None:
        self.start, self.sync = start, sync
        self.marks: dict[str, Any] = {"first_step_s": None, "epoch_starts_s": [], "train_end_s": None,
                                      "epoch_starts_cpu_s": [], "train_end_cpu_s": None,
                                      "val_s": [], "test_s": None, "figures_s": None,
                                      **{f"{part}{unit}_s": [] for part in RECORDING for unit in ("", "_cpu")}}
        self.began: dict[str, float] = {}

    def now(self) -> float:
        self.sync()
        return time.time() - self.start

    def first_step(self) -> None:
        if self.marks["first_step_s"] is None:
            self.marks["first_step_s"] = self.now()

    def epoch_start(self) -> None:
        self.marks["epoch_starts_s"].append(self.now())
        self.marks["epoch_starts_cpu_s"].append(time.process_time())  # all threads; less noisy on a busy machine

    def train_end(self) -> None:
        self.marks["train_end_s"] = self.now()
        self.marks["train_end_cpu_s"] = time.process_time()

    def begin(self, stage: str) -> None:
        self.began[stage] = self.now()

    def end(self, stage: str) -> None:
        seconds = self.now() - self.began.pop(stage)
        if stage == "val":
            self.marks["val_s"].append(seconds)
        else:
            self.marks[f"{stage}_s"] = seconds

    def write(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.marks, **extra}, indent=2) + "\n")


def epoch_timer(path: str, start: float) -> Any:
    """The kit's timer, a Lightning callback that writes its Clock to `path` when testing ends.

    train.py builds it from `+callbacks.epoch_timer={_target_: bench.epoch_timer, path: ..., start: ...}`.
    The class is made here, not at module level, because the floor and classic children run this
    file too and must not import Lightning.

    Args:
        path: the JSON file to write.
        start: time.time() just before the process was started.
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mlplab.diagnostics import LayerDiagnostics
    from mlplab.figures import ParameterHistograms
    from mlplab.record import EpochHistory

    # RECORDING's parts: the callbacks that do each, and their hooks that do it (ModelCheckpoint saves in
    # on_validation_end or on_train_epoch_end, by whether a val pass ran; ParameterHistograms at the last batch)
    recorders = {"checkpoints": (ModelCheckpoint, ("on_validation_end", "on_train_epoch_end")),
                 "diagnostics": (LayerDiagnostics, ("on_train_epoch_end",)),
                 "histograms": (ParameterHistograms, ("on_train_batch_end",)),
                 "history": (EpochHistory, ("on_train_epoch_end",))}

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.clock: Clock | None = None

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if self.clock is None:  # fit and test each call setup; one clock for both
                cuda = trainer.strategy.root_device.type == "cuda"
                self.clock = Clock(start, torch.cuda.synchronize if cuda else lambda: None)
                for callback in trainer.callbacks:  # Lightning looks the hook up on the instance: time it there
                    for part, (kind, hooks) in recorders.items():
                        if isinstance(callback, kind):
                            for hook in hooks:
                                setattr(callback, hook, self.timed(getattr(callback, hook), part))

        def timed(self, hook: Callable[..., None], part: str) -> Callable[..., None]:
            """`hook`, its wall and CPU seconds added to `part`'s entries for the current epoch."""
            def run(*args: Any, **kwargs: Any) -> None:
                wall, cpu = self.clock.now(), time.process_time()
                hook(*args, **kwargs)
                if self.clock.marks["epoch_starts_s"]:  # not in the sanity check's val pass, before epoch 0
                    self.clock.marks[f"{part}_s"][-1] += self.clock.now() - wall
                    self.clock.marks[f"{part}_cpu_s"][-1] += time.process_time() - cpu
            return run

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.clock.epoch_start()
            for part in RECORDING:
                for unit in ("", "_cpu"):
                    self.clock.marks[f"{part}{unit}_s"].append(0.0)

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            # as the other loops mark it: the first batch in hand, before its forward. (Not in
            # on_before_optimizer_step: a callback listening there puts the kit on Lightning's slower
            # step path, see mlplab.fast_path.plain_step_suffices.)
            self.clock.first_step()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.clock.train_end()

        # ModelCheckpoint callbacks run after all others, so val time excludes checkpoint writing
        def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.clock.begin("val")

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.clock.end("val")

        # The test pass excludes the figures: TestFigures draws them in on_test_epoch_end, which runs
        # after the last batch and before this callback's own (callbacks run in the order of conf/'s list).
        def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.clock.begin("test")

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
            self.clock.begin("figures")  # the last batch's mark stands

        def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.clock.end("figures")

        def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.clock.end("test")
            self.clock.marks["test_s"] -= self.clock.marks["figures_s"]
            self.clock.write(path)

    return EpochTimer()


def paired_floor(path: str) -> Any:
    """--paired's callback: before each of the kit's training epochs, one plain-PyTorch epoch in the same process.

    The floor epoch trains a copy of the kit's current model with a new optimizer of the same class and
    settings (the epoch's learning rate included), over the kit's own training tensors in a shuffled order
    of its own, in slices of the kit's batch size: the floor's loop; then it evaluates the copy on the kit's
    val tensors as the floor variant does. Two pairs per epoch:
      train  the floor's steps against the kit's epoch up to the end of its last training batch: its steps,
             Lightning's batch loop, the train metrics and the last batch's histograms;
      whole  the floor's steps and val pass against the kit's whole epoch, up to the next epoch's start (or
             the end of training): also its val pass, checkpoints, diagnostics and history, as epoch s of
             the default mode.
    Same process, same threads, same data, seconds apart: the machine's drift reaches both alike. Writes
    {"train": [(floor s, kit s), ...], "whole": [...]} to `path` when fitting ends.
    """
    import copy

    import lightning as L
    import torch

    class PairedFloor(L.Callback):
        def __init__(self) -> None:
            self.pairs: dict[str, list[tuple[float, float]]] = {"train": [], "whole": []}
            self.kit_start: float | None = None

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.close_epoch()
            x, y = trainer.datamodule.splits["train"]  # (N, D), (N,) on the training device
            x_val, y_val = trainer.datamodule.splits["val"]
            model = copy.deepcopy(pl_module.model)
            kit_optimizer = trainer.optimizers[0]
            optimizer = type(kit_optimizer)(model.parameters(), **kit_optimizer.defaults)
            for group, kit_group in zip(optimizer.param_groups, kit_optimizer.param_groups):
                group["lr"] = kit_group["lr"]  # the schedule's rate for this epoch
            loss_fn = torch.nn.CrossEntropyLoss()
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(trainer.current_epoch))
            order = order.to(x.device)
            size, eval_size = trainer.datamodule.batch_size, trainer.datamodule.eval_batch_size
            self.wait = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
            self.wait()
            start = time.perf_counter()
            for i in range(0, len(x), size):
                rows = order[i:i + size]
                loss = loss_fn(model(x.index_select(0, rows)), y.index_select(0, rows))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self.wait()
            self.floor_train = time.perf_counter() - start
            plain_evaluate(model, loss_fn, ((x_val[i:i + eval_size], y_val[i:i + eval_size])
                                            for i in range(0, len(x_val), eval_size)), x.device)
            self.floor_whole = time.perf_counter() - start
            self.kit_start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            # the last batch's end: callbacks listed before this one (the histograms) have run, val has not
            if batch_idx + 1 == trainer.num_training_batches:
                self.wait()
                self.pairs["train"].append((self.floor_train, time.perf_counter() - self.kit_start))

        def close_epoch(self) -> None:
            if self.kit_start is not None:  # the kit's previous epoch, val and epoch-end work included
                self.wait()
                self.pairs["whole"].append((self.floor_whole, time.perf_counter() - self.kit_start))
                self.kit_start = None

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.close_epoch()

        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            Path(path).write_text(json.dumps(self.pairs) + "\n")

    return PairedFloor()


def run_paired(args: argparse.Namespace, overrides: list[str], work: Path) -> list[dict[str, list[tuple[float, float]]]]:
    """--paired: the kit alone, --rounds runs, each epoch paired with a floor epoch; returns each run's pairs."""
    runs = []
    for round_ in range(args.rounds):
        name = f"paired_{round_}"
        command = kit_command(overrides, work / name,
                              f"paired_floor={{_target_:bench.paired_floor,path:'{work / name}.json'}}")
        _, pairs = run_to_result(f"the paired kit run (round {round_})", command, work / name, time.time(), args)
        runs.append(pairs)
        for part in PAIRED:
            print(f"round {round_ + 1}/{args.rounds} kit/floor {part} epoch, paired: "
                  + " ".join(f"{kit / floor:.2f}" for floor, kit in pairs[part]), flush=True)
    return runs


def paired_ratios(runs: list[dict[str, list[tuple[float, float]]]]) -> dict[str, float]:
    """Per part of PAIRED, the median of kit/floor over every run's epochs after the first."""
    return {part: statistics.median(kit / floor for pairs in runs
                                    for floor, kit in (pairs[part][1:] if len(pairs[part]) > 1 else pairs[part]))
            for part in PAIRED}


# ---- the floor and classic children -------------------------------------------------------------

def plain_evaluate(model: Any, loss_fn: Any, batches: Iterable, device: Any) -> float:
    """The floor's val or test pass: accuracy of `model` over the (x, y) batches, in eval mode without
    gradients; the loss is computed too, as the kit's eval does. Leaves `model` in train mode."""
    import torch

    model.eval()
    with torch.no_grad():
        correct, total, loss_sum = torch.zeros((), device=device), 0, torch.zeros((), device=device)
        for x, y in batches:
            logits = model(x.to(device).flatten(1))  # (B, D) -> (B, K)
            y = y.to(device)
            loss_sum += loss_fn(logits, y) * len(y)
            correct += (logits.argmax(1) == y).sum()
            total += len(y)
    model.train()
    return float(correct) / total  # the one host sync of the pass


def train_and_test(spec: dict[str, Any], clock: Clock, device: Any, epoch_batches: Callable[[int], Iterable],
                   val_batches: Callable[[], Iterable], test_batches: Callable[[], Iterable]) -> float:
    """The loop the floor and classic variants share; only where their batches come from differs.

    Seeds torch as the kit does (L.seed_everything, then the model), so the initial weights are the kit's.

    Args:
        spec: the run's settings, from `compose_settings`.
        clock: marks the first step, epoch starts, val and test passes.
        device: the torch.device the batches are on.
        epoch_batches: epoch -> (x (B, D), y (B,)) training batches of that epoch.
        val_batches, test_batches: () -> (x, y) evaluation batches.

    Returns:
        Test accuracy of the final weights.
    """
    import torch
    from torch import nn

    from mlplab.models import MLP

    torch.manual_seed(spec["seed"])
    model = MLP(**spec["model"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), **spec["optimizer"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **spec["scheduler"])
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(batches: Iterable) -> float:
        return plain_evaluate(model, loss_fn, batches, device)

    for epoch in range(spec["epochs"]):
        clock.epoch_start()
        for step, (x, y) in enumerate(epoch_batches(epoch)):
            if step == spec["limit_batches"]:
                break
            clock.first_step()
            loss = loss_fn(model(x.to(device).flatten(1)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        clock.begin("val")
        evaluate(val_batches())
        clock.end("val")
    clock.train_end()
    clock.begin("test")
    accuracy = evaluate(test_batches())
    clock.end("test")
    return accuracy


def floor(spec: dict[str, Any], clock: Clock) -> float:
    """Whole splits as normalised (N, 784) tensors on the device; an epoch is a randperm cut in slices.

    The split and the per-epoch order are drawn as the kit's data module draws them.
    """
    import torch
    from torchvision import datasets

    device = torch.device(spec["device"])
    dataset = getattr(datasets, spec["folder"])

    def inputs(images: torch.Tensor) -> torch.Tensor:
        # (N, 28, 28) uint8 -> (N, 784) float32, standardised
        return images.reshape(len(images), -1).float().div_(255).sub_(spec["mean"]).div_(spec["std"])

    train, test = dataset(spec["root"], train=True), dataset(spec["root"], train=False)
    perm = torch.randperm(len(train.data), generator=torch.Generator().manual_seed(spec["split_seed"]))
    train_idx, val_idx = perm[:-spec["val_size"]], perm[-spec["val_size"]:]
    x_train, y_train = inputs(train.data[train_idx].to(device)), train.targets[train_idx].to(device)
    x_val, y_val = inputs(train.data[val_idx].to(device)), train.targets[val_idx].to(device)
    x_test, y_test = inputs(test.data.to(device)), test.targets.to(device)

    def slices(x: torch.Tensor, y: torch.Tensor, size: int, order: torch.Tensor | None = None) -> Iterator:
        for i in range(0, len(x), size):
            if order is None:
                yield x[i:i + size], y[i:i + size]
            else:
                j = order[i:i + size]
                yield x.index_select(0, j), y.index_select(0, j)

    def epoch_batches(epoch: int) -> Iterator:
        g = torch.Generator().manual_seed(spec["shuffle_seed"] + epoch)
        return slices(x_train, y_train, spec["batch_size"], torch.randperm(len(x_train), generator=g).to(device))

    return train_and_test(spec, clock, device, epoch_batches,
                          lambda: slices(x_val, y_val, spec["eval_batch_size"]),
                          lambda: slices(x_test, y_test, spec["eval_batch_size"]))


def classic(spec: dict[str, Any], clock: Clock) -> float:
    """The tutorial's data path: PIL images through ToTensor + Normalize one sample at a time."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    dataset = getattr(datasets, spec["folder"])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((spec["mean"],), (spec["std"],))])
    train = dataset(spec["root"], train=True, transform=transform)
    test = dataset(spec["root"], train=False, transform=transform)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec["split_seed"])).tolist()
    train_set, val_set = Subset(train, perm[:-spec["val_size"]]), Subset(train, perm[-spec["val_size"]:])
    shuffle = torch.Generator().manual_seed(spec["shuffle_seed"])
    train_loader = DataLoader(train_set, batch_size=spec["batch_size"], shuffle=True, generator=shuffle)
    val_loader = DataLoader(val_set, batch_size=spec["eval_batch_size"])
    test_loader = DataLoader(test, batch_size=spec["eval_batch_size"])
    return train_and_test(spec, clock, torch.device(spec["device"]), lambda epoch: train_loader,
                          lambda: val_loader, lambda: test_loader)


def run_child(variant: str, spec_path: Path, start: float, result: Path) -> None:
    """Runs the floor or classic variant in this process and writes its marks to `result`."""
    import torch

    from mlplab.allocator import keep_freed_memory

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    keep_freed_memory()  # as the kit's run() does: the same allocator on both sides of the ratio
    clock = Clock(start, torch.cuda.synchronize if spec["device"] == "cuda" else lambda: None)
    accuracy = {"floor": floor, "classic": classic}[variant](spec, clock)
    clock.write(result, test_acc=accuracy)


# ---- the parent: settings, runs, summary ---------------------------------------------------------

def compose_settings(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The kit's overrides, and the same settings resolved from conf/ for the floor and classic children."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mlplab.data import DATASETS

    overrides = [f"data={args.dataset}", f"model={args.model}", f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"data.root='{args.data_root}'", f"data.batch_size={args.batch_size}",
                 f"trainer.max_epochs={args.epochs}", f"torch_threads={args.threads}"]
    if args.val_size is not None:
        overrides.append(f"data.val_size={args.val_size}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if args.limit_batches is not None:  # optimiser steps per epoch, on the fast path too
        overrides.append(f"trainer.limit_train_batches={args.limit_batches}")
    for key, target in (("optimizer", "torch.optim.SGD"), ("scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR"),
                        ("activation", "torch.nn.ReLU"), ("loss", "torch.nn.CrossEntropyLoss")):
        if cfg[key]["_target_"] != target:  # what train_and_test builds; the kit's defaults
            raise SystemExit(f"error: the floor and classic loops build {target} for {key}, but conf/ has "
                             f"{cfg[key]['_target_']}")
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("data", "model", "optimizer", "scheduler")}
    data, info = plain["data"], DATASETS[args.dataset]
    spec = {"folder": info.folder, "root": str(args.data_root), "mean": info.mean, "std": info.std,
            "val_size": data["val_size"], "split_seed": data["split_seed"], "shuffle_seed": data["shuffle_seed"],
            "batch_size": data["batch_size"], "eval_batch_size": data["eval_batch_size"], "seed": cfg.seed,
            "epochs": args.epochs, "limit_batches": args.limit_batches, "threads": args.threads,
            "device": args.device,
            "model": {"in_features": info.input_size, "num_classes": info.num_classes,
                      **{k: v for k, v in plain["model"].items() if k != "_target_"}},
            "optimizer": {k: v for k, v in plain["optimizer"].items() if k not in ("_target_", "_partial_")},
            "scheduler": {k: v for k, v in plain["scheduler"].items() if k not in ("_target_", "_partial_")}}
    return overrides, spec


def machine_load() -> dict[str, float | None]:
    """The 1-minute load average and, where Linux reports it, the share of the last 10 s in which
    some task waited for a CPU (/proc/pressure/cpu): what else was running while a variant ran."""
    try:
        fields = Path("/proc/pressure/cpu").read_text().split()
        pressure = float(fields[1].removeprefix("avg10=")) / 100
    except (OSError, IndexError, ValueError):
        pressure = None
    return {"load_1min": os.getloadavg()[0], "cpu_pressure_10s": pressure}


def run_process(command: list[str], log: Path, start: float, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs one child to its end; returns its exit code, wall time since `start`, CPU time and peak RSS.

    The child is reaped with os.wait4, whose resource usage is that child's alone (RUSAGE_CHILDREN
    would give the largest of all children so far).
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped above; tells Popen not to wait again
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": rss_bytes / 1e6}


def kit_command(overrides: list[str], run_dir: Path, callback: str) -> list[str]:
    """`python train.py <overrides>` into run_dir, without the progress bar, with one of this file's callbacks
    added (`callback`: "<name>={_target_:bench....}")."""
    return [sys.executable, str(ROOT / "train.py"), *overrides, "trainer.enable_progress_bar=false",
            f"hydra.run.dir='{run_dir}'", f"+callbacks.{callback}"]


def run_to_result(what: str, command: list[str], stem: Path, start: float,
                  args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Runs `command` (output to <stem>.log, this folder on PYTHONPATH for the kit's callbacks) and reads the
    JSON it writes to <stem>.json; returns run_process's record and that JSON, or exits naming `what` failed."""
    result, log = stem.with_suffix(".json"), stem.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"),
                                                                      os.environ.get("PYTHONPATH")]))}
    process = run_process(command, log, start, args.timeout, env)
    if process["returncode"] != 0 or not result.is_file():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"error: {what} exited with {process['returncode']}; its output ended:\n{tail}")
    return process, json.loads(result.read_text())


def run_variant(variant: str, round_: int, args: argparse.Namespace, overrides: list[str], spec_path: Path,
                work: Path) -> dict[str, Any]:
    """One run of one variant in its own process; returns its record (the marks, times, RSS and load)."""
    name = f"{variant}_{round_}"
    load = machine_load()
    start = time.time()
    if variant in KIT_VARIANTS:
        command = kit_command([*overrides, *KIT_VARIANTS[variant]], work / name,
                              f"epoch_timer={{_target_:bench.epoch_timer,path:'{work / name}.json',start:{start!r}}}")
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--spec", str(spec_path),
                   "--start", repr(start), "--result", f"{work / name}.json"]
    process, marks = run_to_result(f"{variant} (round {round_})", command, work / name, start, args)
    record = {"variant": variant, "round": round_, "started_at": start, **load, **process}
    if variant in KIT_VARIANTS:  # the kit's own record: its test accuracy (of the best checkpoint)
        marks["test_acc"] = json.loads((work / name / "metrics.json").read_text())["metrics"]["test/acc"]
    for unit in ("s", "cpu_s"):
        boundaries = [*marks.pop(f"epoch_starts_{unit}"), marks.pop(f"train_end_{unit}")]
        marks[f"epoch_{unit}"] = [b - a for a, b in zip(boundaries, boundaries[1:])]
    record.update(marks)
    return record


COLUMNS = {  # summary key: (table heading, format)
    "epoch_s": ("epoch s", ".3f"), "epoch_cpu_s": ("epoch cpu s", ".3f"), "first_step_s": ("first step s", ".2f"),
    "wall_s": ("wall s", ".1f"), "cpu_s": ("cpu s", ".1f"), "peak_rss_mb": ("peak RSS MB", ".0f"),
    "val_s": ("val s", ".4f"), "test_s": ("test s", ".4f"), "figures_s": ("figures s", ".3f"),
    "diagnostics_s": ("diag s", ".4f"), "recording_s": ("record s", ".4f"), "test_acc": ("test acc", ".4f")}
RATIOS = (("kit", "floor", ("epoch", "epoch_cpu", "val", "test", "wall")), ("textbook", "floor", ("epoch", "wall")),
          ("classic", "kit", ("epoch", "wall")))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant medians over rounds, and the ratios of RATIOS, each the median of per-round ratios.

    A ratio to the floor divides by the geometric mean of the floor runs just before and just after the
    run (`closing` marks the extra floor run after the last round), so that a machine whose speed drifts
    through the benchmark slows or speeds both sides alike; without a floor run after it, by the one before.
    """
    def per_run(r: dict[str, Any]) -> dict[str, float | None]:
        later = slice(1, None) if len(r["epoch_s"]) > 1 else slice(None)  # the first epoch warms up
        recorded = bool(r["diagnostics_s"])  # train.py runs only
        parts = {f"{part}{unit}_s": statistics.median(r[f"{part}{unit}_s"][later]) if recorded else None
                 for part in RECORDING for unit in ("", "_cpu")}
        recording = {f"recording{unit}_s": statistics.median(map(sum, zip(*(r[f"{part}{unit}_s"][later]
                                                                            for part in RECORDING))))
                     if recorded else None for unit in ("", "_cpu")}
        return {**{key: r[key] for key in COLUMNS if key not in parts and key not in recording}, **parts,
                **recording, **{key: statistics.median(r[key][later]) for key in ("epoch_s", "epoch_cpu_s", "val_s")}}

    runs = {v: [per_run(r) for r in records if r["variant"] == v and not r.get("closing")] for v in VARIANTS}
    runs = {v: rs for v, rs in runs.items() if rs}
    closing = [per_run(r) for r in records if r.get("closing")]  # none side by side: a round's floor ran with it
    variants = {v: {key: statistics.median(run[key] for run in rs) if rs[0][key] is not None else None
                    for key in COLUMNS} for v, rs in runs.items()}

    def reference(bottom: str, key: str, round_: int) -> float:
        if bottom == "floor" and closing:
            after = (runs["floor"] + closing)[round_ + 1]
            return math.sqrt(runs["floor"][round_][key] * after[key])
        return runs[bottom][round_][key]

    ratios = {}
    for top, bottom, keys in RATIOS:
        if top in runs and bottom in runs:
            for key in keys:
                ratios[f"{top}/{bottom} {key.replace('_', ' ')}"] = statistics.median(
                    run[f"{key}_s"] / reference(bottom, f"{key}_s", i) for i, run in enumerate(runs[top]))
    kit = runs.get("kit", [])  # train.py runs: each carries its recording's timings
    if kit and "floor" in runs:  # the kit's epoch without what it records, against the floor's
        ratios["kit/floor epoch less recording"] = statistics.median(
            (r["epoch_s"] - r["recording_s"]) / reference("floor", "epoch_s", i) for i, r in enumerate(kit))
    for part in ("diagnostics", "recording"):  # shares of the kit's epoch
        for unit in ("", "_cpu"):
            shares = [r[f"{part}{unit}_s"] / r[f"epoch{unit}_s"] for r in kit]
            if shares:
                ratios[f"kit {part}/epoch{unit.replace('_', ' ')}"] = statistics.median(shares)
    recording = {part: statistics.median(r[f"{part}_s"] for r in kit) for part in RECORDING} if kit else None
    loads = [r["load_1min"] for r in records]
    return {"variants": variants, "ratios": ratios, "kit_recording_s": recording,
            "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}}


def format_table(settings: dict[str, Any], summary: dict[str, Any]) -> str:
    """The printed report: one row per variant, then the ratios and the kit's absolutes beside their targets."""
    limit, load = settings["limit_batches"], summary["load_1min"]
    lines = [f"{settings['dataset']}, {settings['model']}, batch {settings['batch_size']}, {settings['device']}, "
             f"{settings['threads']} threads, {settings['epochs']} epochs{f' of {limit} batches' if limit else ''}, "
             f"medians of {settings['rounds']} rounds{', side by side' if settings.get('side_by_side') else ''}; "
             f"load average {load['median']:.1f} "
             f"({load['min']:.1f}-{load['max']:.1f}) on {settings['cores']} cores",
             f"{'variant':<9}" + "".join(f"{heading:>13}" for heading, _ in COLUMNS.values())]
    if load["max"] > settings["cores"] - 0.5 and not settings.get("side_by_side"):  # others shared the cores
        lines.insert(1, f"warning: the machine was busy (load up to {load['max']:.1f} on {settings['cores']} cores); "
                        "times with more than one thread can be several times too long: rerun, or use --threads 1")
    for variant, v in summary["variants"].items():
        cells = ("-" if v[key] is None else format(v[key], fmt) for key, (_, fmt) in COLUMNS.items())
        lines.append(f"{variant:<9}" + "".join(f"{cell:>13}" for cell in cells))
    lines.append("")
    if settings["quick"]:
        lines.append("--quick: a smoke run; the targets below are read from full runs (no --quick)")
    for name, value in summary["ratios"].items():
        target = TARGETS.get(name)
        lines.append(f"{name:<18}{value:8.2f}" + (f"   target <= {target}" if target is not None else ""))
    if summary["kit_recording_s"]:
        lines.append("kit recording s   " + ", ".join(f"{part} {seconds * 1000:.1f} ms"
                                                    for part, seconds in summary["kit_recording_s"].items())
                     + " an epoch")
    kit = summary["variants"].get("kit")
    if kit is not None:
        for name, key in (("kit first step s", "first_step_s"), ("kit wall s", "wall_s"),
                          ("kit peak RSS MB", "peak_rss_mb")):
            lines.append(f"{name:<18}{kit[key]:8.2f}   target <= {TARGETS[name]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    parser.add_argument("--model", choices=("mlp", "softmax_regression"), default="mlp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--paired", action="store_true",
                        help="the kit alone, each training epoch timed beside a plain-PyTorch epoch in its process")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each round's variants at the same time (give --threads so that they fit the cores)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, all variants")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches (optimiser steps) per epoch")
    parser.add_argument("--val-size", type=int, default=None, help="data.val_size (default: conf/data's)")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("DATA_DIR", "data")),
                        help="the folder holding MNIST/raw and FashionMNIST/raw (default: $DATA_DIR, else data)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: outputs/bench/<settings>.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each run")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs of at most {QUICK_BATCHES} batches, 1 round (for CI)")
    # how this script runs the floor and classic variants in their own processes
    parser.add_argument("--child", choices=("floor", "classic"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds = QUICK_EPOCHS, 1
        args.limit_batches = min(args.limit_batches or QUICK_BATCHES, QUICK_BATCHES)
    cores = os.cpu_count() or 1
    if args.side_by_side and len(args.variants) * args.threads > cores:
        parser.error(f"--side-by-side runs {len(args.variants)} variants at once with --threads {args.threads} each, "
                     f"more threads than the {cores} cores: give --threads {max(1, cores // len(args.variants))}")
    for name in ("batch_size", "epochs", "rounds", "threads", "limit_batches", "val_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def report(when: str, record: dict[str, Any]) -> None:
    print(f"{when} {record['variant']:<8} epochs {statistics.median(record['epoch_s']):.3f} s  first step "
          f"{record['first_step_s']:.2f} s  wall {record['wall_s']:.1f} s  load {record['load_1min']:.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Parses argv (sys.argv[1:] when None), runs the rounds, prints the table and writes the JSON."""
    args = parse_args(argv)
    if args.child is not None:
        run_child(args.child, args.spec, args.start, args.result)
        return
    args.data_root = args.data_root.resolve()
    overrides, spec = compose_settings(args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("child", "spec", "start", "result", "json", "timeout")}
    settings.update(cores=os.cpu_count(), python=sys.version.split()[0])
    out = args.json or ROOT / "outputs" / "bench" / (
        f"{args.dataset}_{args.model}_b{args.batch_size}_{args.device}{'_quick' if args.quick else ''}"
        f"{'_paired' if args.paired else ''}.json")
    records = []
    with tempfile.TemporaryDirectory(prefix="mlplab-bench-") as tmp:
        work = Path(tmp)
        if args.paired:
            runs = run_paired(args, overrides, work)
            ratios = paired_ratios(runs)
            print(f"\n{args.dataset}, {args.model}, batch {args.batch_size}, {args.device}, {args.threads} threads, "
                  f"{args.epochs} epochs, {args.rounds} rounds, paired in one process; medians over the epochs "
                  f"after the first:\nkit/floor train epoch {ratios['train']:.2f} (the training steps)\n"
                  f"kit/floor whole epoch {ratios['whole']:.2f} (with the val pass, and the kit's recording)   "
                  f"target <= {TARGETS['kit/floor epoch']}")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "paired_ratios": ratios, "runs": runs}, indent=2) + "\n")
            print(f"\nwrote {out}")
            return
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        for round_ in range(args.rounds):
            if args.side_by_side:  # all at once, each run in a thread of this process waiting for its child
                with ThreadPoolExecutor(len(args.variants)) as pool:
                    done = list(pool.map(lambda v: run_variant(v, round_, args, overrides, spec_path, work),
                                         args.variants))
            else:
                done = (run_variant(variant, round_, args, overrides, spec_path, work) for variant in args.variants)
            for variant, record in zip(args.variants, done):
                records.append(record)
                report(f"round {round_ + 1}/{args.rounds}", record)
        if "floor" in args.variants and len(args.variants) > 1 and not args.side_by_side:
            # one more floor run, so that every other run lies between two (see summarize)
            records.append({**run_variant("floor", args.rounds, args, overrides, spec_path, work), "closing": True})
            report("closing  ", records[-1])
    summary = summarize(records)
    print()
    print(format_table(settings, summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, **summary, "targets": TARGETS, "runs": records}, indent=2)
                   + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
