"""Render a run's test-set figures to PNG: <run dir>/figures/{misclassified,confusion,entropy}.png

    python scripts/render_figures.py outputs/runs/<run> [--checkpoint best|last] [--data-root DIR]

The same figures the run logged to TensorBoard at test time (mlplab/figures.py), from the
checkpoint the run tested (best.ckpt by default).
"""

import argparse
import sys
from pathlib import Path

from mlplab.evaluate import load_checkpoint, predict
from mlplab.figures import test_figures

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
parser.add_argument("--data-root", help="read the dataset from here instead of the run's data.root")
args = parser.parse_args()
ckpt = args.run_dir / "checkpoints" / f"{args.checkpoint}.ckpt"
if not ckpt.is_file():
    sys.exit(f"error: {ckpt} not found: is {args.run_dir} a run dir of train.py that finished an epoch?")
try:
    cfg, model, datamodule = load_checkpoint(ckpt, args.data_root)
except (OSError, ValueError, RuntimeError) as err:
    sys.exit(f"error: {err}")
x, logits, y = predict(model, datamodule)
out = args.run_dir / "figures"
out.mkdir(exist_ok=True)
for name, fig in test_figures(x.reshape(-1, *datamodule.info.image_shape), logits, y, datamodule.classes).items():
    fig.savefig(out / f"{name}.png", dpi=120)
    print(out / f"{name}.png")
