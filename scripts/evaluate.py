"""Test a checkpoint on the test set and print its accuracy and loss.

    python scripts/evaluate.py outputs/runs/<run>/checkpoints/best.ckpt [--data-root DIR]

The checkpoint alone is enough: it carries the run's resolved config. Prints the same test
accuracy that the run recorded in its metrics.json (for best.ckpt, which the run tested).
"""

import argparse
import json
import sys

from mlplab.evaluate import evaluate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
parser.add_argument("--data-root", help="read the dataset from here instead of the run's data.root")
args = parser.parse_args()
try:
    result = evaluate(args.checkpoint, args.data_root)
except (OSError, ValueError, RuntimeError) as err:
    sys.exit(f"error: {err}")
print(f"test/acc {result['test/acc']:.4f}  test/loss {result['test/loss']:.4f}  ({result['n']} images)  {args.checkpoint}")
print(json.dumps(result))
