"""Summarise finished runs: a table on stdout, summary.csv, summary.md and summary.png in the dir.

    python scripts/summarize.py outputs/multirun/<timestamp>   # one sweep
    python scripts/summarize.py outputs                        # every run and sweep below, recursively

Exits 2 when the dir does not exist or holds no job dir; 0 otherwise, failed jobs included
(they are in the report). The layout is described in mlplab/report.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlplab.report import NoJobsError, format_table, summarize, write_report


def main(argv: list[str] | None = None) -> None:
    """Parses argv (sys.argv[1:] when None), then writes and prints the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a sweep dir, a run dir, or outputs/ as a whole")
    parser.add_argument("--acc-threshold", type=float, metavar="ACC",
                        help="val/acc for the 'epochs to threshold' column (default: the one each run recorded)")
    args = parser.parse_args(argv)
    if args.acc_threshold is not None and not 0 < args.acc_threshold <= 1:
        parser.error(f"--acc-threshold {args.acc_threshold} must be in (0, 1]")
    try:
        summary = summarize(args.dir, args.acc_threshold)
    except NoJobsError as err:
        parser.error(str(err))  # exit status 2, like any other bad argument
    print(format_table(summary))
    paths = write_report(summary)
    print(f"\n{summary.headline}\nwrote {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
