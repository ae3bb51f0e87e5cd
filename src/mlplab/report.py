"""The sweep report: every job under a dir in one table, best first, and summary.csv/.md/.png beside it.

    python scripts/summarize.py outputs/multirun/<timestamp>   # one sweep
    python scripts/summarize.py outputs                        # every run and sweep, searched recursively

It reads what the jobs already wrote and re-runs nothing. A job dir is any dir holding
metrics.json or a .hydra/ folder; one with .hydra/ alone was killed before it could record
anything and is reported as `missing`. A job's overrides come from .hydra/overrides.yaml, or
from metrics.json where Hydra left no .hydra/.

Layout
    Columns: the override keys whose value differs between the jobs summarised (a key set to
    one value everywhere says nothing about the comparison); `-` where a job leaves a key at
    its config default. When no key differs, a `run` column names the job dir instead.
    Then n, final val/acc, test/acc, test/loss, epochs, epochs to threshold (see below), wall time
    per job, status.
    Rows: successful jobs whose overrides are equal apart from `seed=` share one row, which
    shows the mean ± sample standard deviation (n - 1 in the denominator) over its n jobs and
    lists their seeds in the seed column. Reruns of one config with one seed (two single runs
    under outputs/runs/) are such a group too: n counts jobs, not distinct seeds. Every job
    that did not succeed (failed, interrupted, missing) is a row of its own with the reason,
    so a lost seed neither drags a mean nor hides inside one. Best first by (mean) final
    val/acc; unsuccessful rows last, in path order.
    Numbers: accuracies and losses to 4 decimals (0.9634), wall time in seconds to 1 decimal.
    summary.csv is tidy, one row per job in table order: job (dir relative to the summarised
    dir), group (its row's label in the table), the differing keys, status, error, the full
    overrides (to repeat it: python train.py <overrides>), epochs, wall_time_s and every final
    metric, unrounded.
    summary.md holds the same table, the full error of each unsuccessful job and the plot.
    summary.png: left, val/acc per epoch of every job (one colour per row label, dashed where
    the job did not succeed); right, test/acc per successful row with ±1 std error bars.
    layers.png, where the jobs logged mlplab.diagnostics: each row's weight-gradient norm per hidden
    layer (mean over its jobs), after the first and after the last epoch.
Convergence
    "epochs to threshold" is the number of training epochs after which val/acc first reached a
    threshold: the one each run recorded in its metrics.json ("convergence": the root config key
    acc_threshold, or the dataset's own in mlplab.data.DATASETS), or the one given to the report
    (scripts/summarize.py --acc-threshold, the sweep's acc_threshold), recomputed from each job's
    history. A row shows the mean ± std over its jobs, "(k of n)" when only k reached it, and "not
    reached" when none did. The column is left out when no job has a threshold (runs recorded
    before it existed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlplab.rundir import METRICS_FILE, launcher_rank

log = logging.getLogger(__name__)

CSV_FILE, MARKDOWN_FILE, PLOT_FILE, LAYERS_FILE = "summary.csv", "summary.md", "summary.png", "layers.png"
RANK_BY = "val/acc"
HEADLINE = (RANK_BY, "test/acc", "test/loss")  # the table's metric columns
NUMBER_COLUMNS = ("n", *HEADLINE, "epochs", "time (s)")  # between the settings columns and the status
TO_THRESHOLD = "epochs to threshold"  # a number column after "epochs", where any job has a threshold
GRAD_NORM = re.compile(r"^diagnostics/layer_(\d+)/grad_norm$")  # mlplab.diagnostics.tag(i, "grad_norm")
STATUSES = ("ok", "failed", "interrupted", "missing")  # in the order the headline counts them
SEED = "seed"  # the config key that seeds a run; jobs that differ only in it are one group
MISSING_ERROR = "no metrics.json (killed before it finished?)"
REASON_WIDTH = 60  # characters of an error in the table; summary.md and summary.csv keep it whole


class NoJobsError(ValueError):
    """The dir to summarise does not exist or holds no job dir."""


@dataclass
class Job:
    """One job dir, as its files describe it.

    Args:
        path: the job dir.
        status: "ok" | "failed" | "interrupted" from metrics.json; "missing" without one.
        error: one line naming what went wrong, or None.
        overrides: its command-line overrides, e.g. ["activation=relu", "seed=1"].
        metrics: final metrics by name; an unsuccessful job may lack some or all.
        history: one row per finished epoch, as in metrics.json.
        epochs: finished epochs; None when missing.
        wall_time_s: seconds the job ran; None when missing.
        convergence: {"metric": "val/acc", "threshold": t, "epochs": the epochs it took, None if never};
            None where the job recorded none (missing, or written before metrics.json had it).
    """

    path: Path
    status: str
    error: str | None
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: int | None = None
    wall_time_s: float | None = None
    convergence: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @cached_property
    def params(self) -> dict[str, str]:
        """The overrides as key -> value; `+key=v` and `++key=v` set the same key as `key=v`."""
        params = {}
        for item in self.overrides:
            key, _, value = item.partition("=")
            params[key.lstrip("+")] = value
        return params


@dataclass
class Group:
    """One row of the table: the successful seeds of one config, or one unsuccessful job.

    Args:
        label: the row's differing overrides, seed aside ("activation=relu, optimizer.lr=0.1");
            the job dir (or "3 runs") when none differs.
        jobs: in path order; all successful, or a single unsuccessful one.
    """

    label: str
    jobs: list[Job]

    @property
    def n(self) -> int:
        return len(self.jobs)

    @property
    def status(self) -> str:
        return self.jobs[0].status  # a group of several is all "ok"

    def values(self, name: str) -> list[float]:
        return [job.metrics[name] for job in self.jobs if name in job.metrics]

    def mean(self, name: str) -> float | None:
        values = self.values(name)
        return statistics.fmean(values) if values else None

    def std(self, name: str) -> float | None:
        """Sample standard deviation (n - 1 denominator); None below two values."""
        values = self.values(name)
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Summary:
    """Every job under `root`, grouped and ranked.

    Args:
        root: the dir summarised; the report files go here.
        jobs: every job dir found under it, in path order.
        keys: the override keys whose value differs between jobs, the table's columns.
        groups: the table's rows, best first.
    """

    root: Path
    jobs: list[Job]
    keys: list[str]
    groups: list[Group]

    @property
    def unsuccessful(self) -> list[Job]:
        return [job for job in self.jobs if not job.ok]

    @property
    def headline(self) -> str:
        """E.g. "5 jobs under outputs/multirun/x: 4 ok, 1 failed"."""
        counts = Counter(job.status for job in self.jobs)
        order = sorted(counts, key=lambda s: (STATUSES.index(s) if s in STATUSES else len(STATUSES), s))
        jobs = "1 job" if len(self.jobs) == 1 else f"{len(self.jobs)} jobs"
        return f"{jobs} under {self.root}: " + ", ".join(f"{counts[s]} {s}" for s in order)

    def relative(self, job: Job) -> str:
        return job.path.relative_to(self.root).as_posix()


def read_job(path: str | Path) -> Job:
    """The Job that one job dir's files describe."""
    path = Path(path)
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = None
    if overrides_file.is_file():
        overrides = [str(item) for item in OmegaConf.to_container(OmegaConf.load(overrides_file))]
    metrics_file = path / METRICS_FILE
    if not metrics_file.is_file():
        return Job(path, "missing", MISSING_ERROR, overrides or [])
    try:
        record = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as err:  # write_metrics is atomic, so only outside hands get here
        return Job(path, "missing", f"unreadable {METRICS_FILE}: {err}", overrides or [])
    return Job(path, record["status"], record["error"],
               overrides if overrides is not None else list(record["overrides"]), metrics=record["metrics"],
               history=record["history"], epochs=record["epochs"], wall_time_s=record["wall_time_s"],
               convergence=record.get("convergence"))  # absent from runs recorded before it existed


def epochs_to_reach(history: list[dict[str, Any]], threshold: float, metric: str = RANK_BY) -> int | None:
    """Training epochs after which `metric` first was >= threshold (1: after the first), None if never."""
    for row in history:
        if row.get(metric) is not None and row[metric] >= threshold:
            return row["epoch"] + 1
    return None


def _natural_key(path: Path) -> list[str | int]:
    # "2_activation=selu" before "10_activation=relu"; re.split alternates text and digit runs,
    # so equal positions always compare str with str and int with int.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", path.as_posix()))]


def collect_jobs(root: str | Path) -> list[Job]:
    """Every job dir under root (root included), in natural path order.

    Raises:
        NoJobsError: root is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise NoJobsError(f"{root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if METRICS_FILE in filenames or ".hydra" in dirnames:
            found.append(Path(dirpath))
            dirnames.clear()  # below a job dir lie checkpoints and event files, never another job
    return [read_job(path) for path in sorted(found, key=_natural_key)]


def differing_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value (or absence) is not the same in every job, in order of appearance."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.params))
    return [key for key in keys if len({job.params.get(key) for job in jobs}) > 1]


def group_jobs(jobs: list[Job], keys: list[str], root: Path) -> list[Group]:
    """The table's rows, best first (see the module docstring)."""
    members: dict[tuple[tuple[str, str], ...], list[Job]] = {}
    rows: list[list[Job]] = []
    for job in jobs:
        if not job.ok:
            rows.append([job])
            continue
        config = tuple(sorted((k, v) for k, v in job.params.items() if k != SEED))
        if config not in members:
            members[config] = []
            rows.append(members[config])
        members[config].append(job)

    def label(row: list[Job]) -> str:
        parts = [f"{key}={row[0].params[key]}" for key in keys if key != SEED and key in row[0].params]
        if parts:
            return ", ".join(parts)
        if len(row) > 1:
            return f"{len(row)} runs"
        return row[0].path.name if row[0].path == root else row[0].path.relative_to(root).as_posix()

    def rank(group: Group) -> tuple[int, float]:
        acc = group.mean(RANK_BY)
        if group.status != "ok":
            return 2, 0.0
        return (1, 0.0) if acc is None else (0, -acc)

    # sorted() is stable: equal rows keep path order
    return sorted((Group(label(row), row) for row in rows), key=rank)


def summarize(root: str | Path, acc_threshold: float | None = None) -> Summary:
    """Reads every job under root into a Summary; writes nothing (write_report does).

    Args:
        root: a sweep dir, a run dir, or a folder of them.
        acc_threshold: the val/acc for "epochs to threshold", recomputed from each job's history; None
            keeps the threshold each job recorded.

    Raises:
        NoJobsError: root is not a directory, or holds no job dir.
    """
    root = Path(root)
    jobs = collect_jobs(root)
    if not jobs:
        raise NoJobsError(f"no job dirs under {root} (a job dir holds {METRICS_FILE} or a .hydra/ folder)")
    if acc_threshold is not None:
        for job in (job for job in jobs if job.status != "missing"):  # a missing job has no history to read
            job.convergence = {"metric": RANK_BY, "threshold": acc_threshold,
                               "epochs": epochs_to_reach(job.history, acc_threshold)}
    keys = differing_keys(jobs)
    return Summary(root, jobs, keys, group_jobs(jobs, keys, root))


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _span(values: list[int]) -> str:
    """E.g. epochs of a group: 2 when all are 2, 2-3 when they range, - when there are none."""
    if not values:
        return "-"
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _thresholds(summary: Summary) -> list[float]:
    """The distinct thresholds of "epochs to threshold", in order; [] leaves the column out."""
    return list(dict.fromkeys(job.convergence["threshold"] for job in summary.jobs if job.convergence))


def _to_threshold(group: Group) -> str:
    """E.g. "3.0 ± 1.0", "4.5 (2 of 3)", "not reached", or "-" without a threshold."""
    recorded = [job.convergence["epochs"] for job in group.jobs if job.convergence]
    if not recorded:
        return "-"
    reached = [epochs for epochs in recorded if epochs is not None]
    if not reached:
        return "not reached"
    text = (f"{reached[0]}" if len(reached) == 1
            else f"{statistics.fmean(reached):.1f} ± {statistics.stdev(reached):.1f}")
    return text if len(reached) == len(recorded) else f"{text} ({len(reached)} of {len(recorded)})"


def _cells(summary: Summary, group: Group) -> list[str]:
    if summary.keys:
        settings = [",".join(dict.fromkeys(job.params.get(key, "-") for job in group.jobs)) for key in summary.keys]
    else:
        settings = [group.label]
    epochs = [job.epochs for job in group.jobs if job.epochs is not None]
    times = [job.wall_time_s for job in group.jobs if job.wall_time_s is not None]
    error = group.jobs[0].error  # a group of several is all "ok", without errors
    status = f"{group.status}: {_shorten(error, REASON_WIDTH)}" if error else group.status
    convergence = [_to_threshold(group)] if _thresholds(summary) else []
    return [*settings, str(group.n), *(_number(group.mean(name), group.std(name)) for name in HEADLINE),
            _span(epochs), *convergence, f"{statistics.fmean(times):.1f}" if times else "-", status]


def _number_columns(summary: Summary) -> list[str]:
    columns = list(NUMBER_COLUMNS)
    if _thresholds(summary):
        columns.insert(columns.index("epochs") + 1, TO_THRESHOLD)
    return columns


def _header(summary: Summary) -> list[str]:
    return [*(summary.keys or ["run"]), *_number_columns(summary), "status"]


def _numeric(summary: Summary) -> list[bool]:
    """Which columns hold numbers, aligned right."""
    return [False] * len(summary.keys or ["run"]) + [True] * len(_number_columns(summary)) + [False]


def format_table(summary: Summary) -> str:
    """The table as aligned plain text, for a terminal; errors shortened."""
    header = _header(summary)
    rows = [header, *(_cells(summary, group) for group in summary.groups)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(row, widths, _numeric(summary))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_markdown(summary: Summary) -> str:
    """summary.md: the headline, the table, the plot and the full error of each unsuccessful job."""
    header = _header(summary)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = ["---:" if right else "---" for right in _numeric(summary)]
    text = [f"# Sweep summary\n\n{summary.headline}.\n",
            f"Best first by final {RANK_BY}. Successful jobs that differ only in `{SEED}` share a row: "
            f"mean ± sample standard deviation over its n jobs. Per-job values: [{CSV_FILE}]({CSV_FILE}).\n",
            line(header), line(align), *(line(_cells(summary, group)) for group in summary.groups),
            f"\n![{RANK_BY} per epoch of each job; test/acc of each row]({PLOT_FILE})\n"]
    if thresholds := _thresholds(summary):
        text.insert(2, f"{TO_THRESHOLD}: training epochs until {RANK_BY} first reached "
                       f"{' or '.join(f'{t:g}' for t in thresholds)} (the job's threshold; per job in {CSV_FILE}).\n")
    if _layer_grad_norms(summary.jobs):
        text.append(f"![weight-gradient norm per hidden layer, by row]({LAYERS_FILE})\n")
    if summary.unsuccessful:
        text.append("## Jobs that did not succeed\n")
        text += [f"- `{summary.relative(job)}`: {job.status}: {job.error}" for job in summary.unsuccessful]
    return "\n".join(text) + "\n"


def write_csv(summary: Summary, path: Path) -> None:
    """summary.csv: one row per job, in table order (see the module docstring)."""
    metrics = list(dict.fromkeys([*HEADLINE, *sorted({name for job in summary.jobs for name in job.metrics})]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "group", *summary.keys, "status", "error", "overrides", "epochs",
                         "acc_threshold", "epochs_to_threshold", "wall_time_s", *metrics])
        for group in summary.groups:
            for job in group.jobs:
                convergence = job.convergence or {}
                writer.writerow([summary.relative(job), group.label, *(job.params.get(k, "") for k in summary.keys),
                                 job.status, job.error, " ".join(job.overrides), job.epochs,
                                 convergence.get("threshold"), convergence.get("epochs"), job.wall_time_s,
                                 *(job.metrics.get(name) for name in metrics)])


def _layer_grad_norms(jobs: list[Job]) -> dict[int, dict[str, float]]:
    """{hidden layer: {"first": grad norm after epoch 1, "last": after the last}} of one job, or of several
    averaged layer by layer; {} when none logged diagnostics."""
    norms: dict[int, dict[str, list[float]]] = {}
    for job in jobs:
        for when, row in (("first", job.history[:1]), ("last", job.history[-1:])):
            for name, value in (row[0] if row else {}).items():
                if (match := GRAD_NORM.match(name)) and value is not None:
                    norms.setdefault(int(match[1]), {"first": [], "last": []})[when].append(value)
    return {layer: {when: statistics.fmean(v) for when, v in values.items() if v}
            for layer, values in sorted(norms.items())}


def plot_layers(summary: Summary, path: Path) -> bool:
    """layers.png: weight-gradient norm per hidden layer of each successful row (log scale), after the first
    and the last epoch. Returns False, writing nothing, when no job logged them."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [(g.label, norms) for g in summary.groups if g.status == "ok" and (norms := _layer_grad_norms(g.jobs))]
    if not rows:
        return False
    palette = colormaps["tab10" if len(rows) <= 10 else "tab20"].colors
    fig = Figure(figsize=(13, 4.5 + 0.2 * math.ceil(len(rows) / 3)), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2, sharey=True)
    for panel, when, title in ((panels[0], "first", "after epoch 1"), (panels[1], "last", "after the last epoch")):
        for i, (label, norms) in enumerate(rows):
            layers = [layer for layer in norms if when in norms[layer]]
            panel.plot(layers, [norms[layer][when] for layer in layers], marker="o", label=label,
                       color=palette[i % len(palette)], linestyle="-" if i < len(palette) else "--")
        panel.set(title=f"weight-gradient norm per hidden layer, {title}", xlabel="hidden layer (1: next to the input)",
                  yscale="log")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    panels[0].set_ylabel("||dL/dW|| on the probe batch")
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    fig.suptitle(summary.headline, fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def plot(summary: Summary, path: Path) -> None:
    """summary.png: val/acc per epoch of every job (left), test/acc per successful row (right)."""
    # Imported here: Hydra instantiates SweepReport in every single run too, which never plots.
    # A bare Figure on an Agg canvas leaves pyplot's global backend alone (a notebook keeps its own).
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = list(dict.fromkeys(g.label for g in summary.groups))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    ranked = [g for g in summary.groups if g.status == "ok" and g.mean("test/acc") is not None]
    # Bar labels wrap at their commas, so that long ones leave the bars some width.
    wrapped = [textwrap.fill(g.label, width=32, break_long_words=False) for g in ranked]
    legend_columns = max(1, min(len(labels), 4, 160 // (max(map(len, labels)) + 8)))  # ~160 characters a row
    legend_rows = math.ceil(len(labels) / legend_columns)
    bar_lines = sum(label.count("\n") + 1 for label in wrapped)
    fig = Figure(figsize=(13, 4 + 0.2 * legend_rows + 0.2 * max(0, bar_lines - 10)), layout="constrained")
    FigureCanvasAgg(fig)
    curves, bars = fig.subplots(1, 2)

    handles = {}
    for group in summary.groups:
        for job in group.jobs:
            if not job.history:
                continue
            epochs = [row["epoch"] for row in job.history]
            acc = [math.nan if row.get(RANK_BY) is None else row[RANK_BY] for row in job.history]
            line, = curves.plot(epochs, acc, color=colours[group.label], linestyle="-" if job.ok else "--",
                                marker=".")
            handles.setdefault(group.label, line)
    curves.set(title=f"{RANK_BY} per epoch (dashed: did not succeed)", xlabel="epoch", ylabel=RANK_BY)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles:  # one legend for both panels, below them: labels are long and would hide the curves
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=legend_columns,
                   fontsize="small", frameon=False)
    else:
        curves.text(0.5, 0.5, "no job finished an epoch", ha="center", transform=curves.transAxes)

    if ranked:
        means = [g.mean("test/acc") for g in ranked]
        stds = [g.std("test/acc") or 0.0 for g in ranked]
        # horizontal, best at the top: the labels read along the axis at any length; a NaN
        # error draws no bar, where a 0 would draw a cap for a single job
        drawn = bars.barh(range(len(ranked)), means, xerr=[s or math.nan for s in stds], capsize=3,
                          color=[colours[g.label] for g in ranked])
        bars.bar_label(drawn, fmt="%.4f", fontsize="small", padding=3)
        bars.set_yticks(range(len(ranked)), wrapped, fontsize="small")
        bars.invert_yaxis()
        # The axis starts just below the lowest bar, not at 0: accuracies within one sweep
        # usually differ in the second or third decimal, invisible on a 0-1 scale.
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        span = max(high - low, 0.01)
        bars.set_xlim(max(0.0, low - span * 0.5), high + span * 0.35)  # right margin: the value labels
    else:
        bars.text(0.5, 0.5, "no successful job", ha="center", transform=bars.transAxes)
    bars.set(title="test/acc (mean ± std over seeds)", xlabel="test/acc")
    fig.suptitle(summary.headline, fontsize="small")
    fig.savefig(path, dpi=100)


def write_report(summary: Summary) -> list[Path]:
    """Writes summary.csv, summary.md and summary.png (and layers.png, where the jobs logged
    diagnostics) into summary.root; returns their paths."""
    paths = [summary.root / name for name in (CSV_FILE, MARKDOWN_FILE, PLOT_FILE)]
    write_csv(summary, paths[0])
    paths[1].write_text(format_markdown(summary))
    plot(summary, paths[2])
    if plot_layers(summary, summary.root / LAYERS_FILE):
        paths.append(summary.root / LAYERS_FILE)
    return paths


def report_sweep(sweep_dir: Path, acc_threshold: float | None = None) -> Summary:
    """Prints the table of the jobs under `sweep_dir` and writes summary.csv/md/png; returns the summary.

    Called when the sweep ends, and by train.py when Ctrl-C or SIGTERM stops it: the report then holds the
    jobs that ran, the interrupted one among them.

    Args:
        sweep_dir: the sweep's folder.
        acc_threshold: the val/acc of "epochs to threshold" (see summarize); None keeps each job's own.
    """
    summary = summarize(sweep_dir, acc_threshold)
    print(format_table(summary))
    try:
        paths = write_report(summary)
    except Exception:  # a broken plot must not turn a sweep with failed jobs into exit status 0
        log.exception("could not write the sweep report into %s", sweep_dir)
    else:
        log.info("%s; report: %s", summary.headline, ", ".join(str(p) for p in paths))
    return summary


class SweepReport(Callback):
    """Reports a multirun once its last job has ended, and fails the sweep if any job did.

    train.py lets a failed job return so that the other jobs still run; this is where the sweep
    gets its non-zero exit status. Hydra turns an Exception raised in a callback into a
    warning, but SystemExit is not an Exception and ends the process with status 1.

    Args:
        acc_threshold: the val/acc of "epochs to threshold" (see summarize); None keeps each job's own.
    """

    def __init__(self, acc_threshold: float | None = None) -> None:
        self.acc_threshold = acc_threshold

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if launcher_rank() != 0:
            return  # torchrun / srun make every rank a Hydra multirun: one report, rank 0's, after its last job
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = report_sweep(sweep_dir, self.acc_threshold)
        if summary.unsuccessful:
            raise SystemExit(f"{len(summary.unsuccessful)} of {len(summary.jobs)} jobs failed; "
                             f"see {sweep_dir / MARKDOWN_FILE}")
