"""The PP-OCRv4 text detector judged as its users judge it: text lines found, on hard pages.

    pip install rapidocr_onnxruntime          # the model (and OpenCV) ship with the wheel
    qsearch optimize --config "$(python -m qsearch.examples.ocr_det_lines)" --budget 50

The same model as `ocr_det`; the pages are harder (small type, faint ink on grey paper, heavy
noise) and the metric is box-level F1: connected regions of the probability map, grown back by
RapidOCR's unclip ratio, matched one-to-one to the rendered text lines at IoU >= 0.5 (a line
merged with its neighbour or split in two is a miss). Per-page parts, so qsearch can tell how
finely the split resolves the metric. Naive INT8 loses lines here where pixel F1 barely moves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qsearch.examples import builder, ocr_det
from qsearch.examples.builder import finish, is_fresh
from qsearch.examples.pages import PageRenderer, normalize
from qsearch.files import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "ocr_det_lines"
SPLITS = {"calib": 32, "search": 96, "test": 160}

WORKLOAD = builder.workload_yaml(
    "PP-OCRv4 text detector, box-level F1 on hard pages (written by qsearch.examples.ocr_det_lines)",
    "ppocrv4_det_lines",
    '{search: "qsearch.examples.ocr_det_lines:search_box_f1", test: "qsearch.examples.ocr_det_lines:test_box_f1"}',
    "0.01", batch_size=16, latency_batch=4)


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and render the hard splits (inputs + line boxes) into `out`; returns workload.yaml."""
    blob = ocr_det.model_path().read_bytes()
    key = hashlib.sha256(blob + repr((SPLITS, ocr_det.SIZE)).encode() + b"hard-lines-v1").hexdigest()[:16]
    if not force and is_fresh(out, key):
        return out / "workload.yaml"
    out.mkdir(parents=True, exist_ok=True)
    renderer = PageRenderer(seed=5, hard=True)
    size = ocr_det.SIZE
    for name, n in SPLITS.items():
        pages = [renderer.page(size, size) for _ in range(n)]
        np.savez(out / f"{name}.npz", x=np.stack([normalize(p.image, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for p in pages]))
        np.save(out / f"{name}.truth.npy", np.stack([ocr_det.truth_mask(p.boxes) for p in pages]))
        atomic_write_text(out / f"{name}.boxes.json", json.dumps([list(map(list, p.boxes)) for p in pages]))
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


def _folder() -> Path:
    return Path(os.environ.get("QSEARCH_OCR_DET_LINES", DEFAULT_OUT))


def search_box_f1(session) -> list[list[int]]:
    return ocr_det.box_f1_parts(session, "search", _folder())


def test_box_f1(session) -> list[list[int]]:
    return ocr_det.box_f1_parts(session, "test", _folder())


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
