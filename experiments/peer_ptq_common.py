"""What `peer_aimet_ptq.py` and `peer_quark_ptq.py` share (each runs in its own venv, with the
repository on PYTHONPATH): their arguments, and the calibration arrays the model takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx


def parse(techniques: str, default: str, extra=None):
    """(arguments, the float model, {input name: calibration array}) from MODEL CALIB_NPZ OUT."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--technique", default=default, help=f"{techniques}, joined with +")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(args.model))
    names = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    z = np.load(args.calib)
    return args, model, {k: z[k] for k in z.files if k in names}
