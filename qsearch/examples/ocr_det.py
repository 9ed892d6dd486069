"""A real 107-layer detector with a custom metric: PP-OCRv4 text detection (DBNet, opset 12).

    pip install rapidocr_onnxruntime          # the model ships inside the wheel
    qsearch optimize --config "$(python -m qsearch.examples.ocr_det)" --budget 50

The model comes from the PyPI package `rapidocr_onnxruntime` (PP-OCRv4 mobile detector: 62 Conv,
hardswish as Add/Clip/Div/Mul, squeeze-excite, FPN with Resize; 107 quantizable layers); nobody
here trained it. Data: rendered pages (`pages.py`) whose text-line boxes are known. The metric is
the user-style custom score the real pipeline cares about: pixel F1 of the binarized probability
map (threshold 0.3, as RapidOCR uses) against the text-line boxes shrunk like DBNet's labels, an
entry point `module:function(session) -> float` that owns its data.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from qsearch.examples import builder
from qsearch.examples.builder import finish, is_fresh
from qsearch.examples.pages import PageRenderer, normalize
from qsearch.files import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "ocr_det"
SIZE = 256  # pages are drawn at the model's input size (a multiple of 32)
SPLITS = {"calib": 32, "search": 64, "test": 128}
THRESH = 0.3
SHRINK = 0.4  # DBNet's shrink ratio for the probability-map labels

WORKLOAD = builder.workload_yaml(
    "PP-OCRv4 text detector from the rapidocr_onnxruntime wheel (written by qsearch.examples.ocr_det)",
    "ppocrv4_det", '{search: "qsearch.examples.ocr_det:search_f1", test: "qsearch.examples.ocr_det:test_f1"}',
    "0.01", batch_size=16, latency_batch=4)


def model_path() -> Path:
    return builder.wheel_file("rapidocr_onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "OCR detector")


def truth_mask(boxes) -> np.ndarray:
    """Text-line boxes shrunk by DBNet's rule (offset = area * (1 - r^2) / perimeter)."""
    m = np.zeros((SIZE, SIZE), bool)
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        if w <= 1 or h <= 1:
            continue
        d = w * h * (1 - SHRINK**2) / (2 * (w + h))
        m[int(y0 + d): int(np.ceil(y1 - d)), int(x0 + d): int(np.ceil(x1 - d))] = True
    return m


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and render the splits (inputs + truth masks) into `out`; returns workload.yaml."""
    blob = model_path().read_bytes()
    key = hashlib.sha256(blob + repr((SPLITS, SIZE, SHRINK)).encode() + b"pages-v2").hexdigest()[:16]
    wl = out / "workload.yaml"
    if not force and is_fresh(out, key):
        return wl
    out.mkdir(parents=True, exist_ok=True)
    renderer = PageRenderer(seed=2)
    for name, n in SPLITS.items():
        pages = [renderer.page(SIZE, SIZE) for _ in range(n)]
        x = np.stack([normalize(p.image, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for p in pages])
        np.savez(out / f"{name}.npz", x=x)
        np.save(out / f"{name}.truth.npy", np.stack([truth_mask(p.boxes) for p in pages]))
        atomic_write_text(out / f"{name}.boxes.json", json.dumps([list(map(list, p.boxes)) for p in pages]))
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


@lru_cache(maxsize=4)
def _split(name: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(folder)
    return np.load(d / f"{name}.npz")["x"], np.load(d / f"{name}.truth.npy")


def f1_parts(session, split: str, folder: Path | None = None) -> list[list[int]]:
    """Pixel F1 of (probability > 0.3) against the shrunk text-line boxes over the whole split, as
    per-page parts (2 TP, 2 TP + FP + FN): their ratio of sums is the split's F1, and qsearch
    resamples pages to tell how finely the split resolves it."""
    x, truth = _split(split, str(folder or Path(os.environ.get("QSEARCH_OCR_DET", DEFAULT_OUT))))
    name = session.get_inputs()[0].name
    parts = []
    for i in range(0, len(x), 16):
        pred = session.run(None, {name: x[i: i + 16]})[0][:, 0] > THRESH
        for p, t in zip(pred, truth[i: i + 16]):
            tp, fp, fn = int(np.sum(p & t)), int(np.sum(p & ~t)), int(np.sum(~p & t))
            parts.append([2 * tp, 2 * tp + fp + fn])
    return parts


def f1(session, split: str, folder: Path | None = None) -> float:
    parts = np.asarray(f1_parts(session, split, folder), float)
    return float(parts[:, 0].sum() / max(parts[:, 1].sum(), 1.0))


UNCLIP = 1.6  # RapidOCR's unclip ratio: a detected (shrunk) region grows back by area * r / perimeter
IOU = 0.5  # a detected box matches a text line when their IoU is at least this


@lru_cache(maxsize=4)
def _boxes(name: str, folder: str) -> tuple:
    return tuple(tuple(tuple(b) for b in page) for page in json.loads((Path(folder) / f"{name}.boxes.json").read_text()))


def detected_boxes(prob: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Text-line boxes as DBNet's post-processing finds them: connected regions of
    (probability > 0.3), each grown back by the unclip offset (OpenCV, which RapidOCR needs anyway)."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats((prob > THRESH).astype(np.uint8), connectivity=4)
    boxes = []
    for x, y, w, h, area in stats[1:n]:
        if area < 4:  # specks, as DBNet's minimum size drops them
            continue
        d = area * UNCLIP / (2 * (w + h))
        boxes.append((x - d, y - d, x + w + d, y + h + d))
    return boxes


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def box_parts(found, truth) -> list[int]:
    """(2 x matched boxes, detected + true boxes) of one page: greedy one-to-one matching at IoU >= 0.5."""
    pairs = sorted(((_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t, matched = set(), set(), 0
    for iou, i, j in pairs:
        if iou < IOU:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
            matched += 1
    return [2 * matched, len(found) + len(truth)]


def box_f1_parts(session, split: str, folder: Path | None = None) -> list[list[int]]:
    """Box-level F1 of the detected text lines against the rendered ones, per page: a stricter
    metric than pixel F1 (a line merged with its neighbour or split in two is a miss)."""
    folder = str(folder or Path(os.environ.get("QSEARCH_OCR_DET", DEFAULT_OUT)))
    x, _ = _split(split, folder)
    truth = _boxes(split, folder)
    name = session.get_inputs()[0].name
    parts = []
    for i in range(0, len(x), 16):
        probs = session.run(None, {name: x[i: i + 16]})[0][:, 0]
        parts += [box_parts(detected_boxes(p), t) for p, t in zip(probs, truth[i: i + 16])]
    return parts


def search_box_f1(session) -> list[list[int]]:
    return box_f1_parts(session, "search")


def test_box_f1(session) -> list[list[int]]:
    return box_f1_parts(session, "test")


def search_f1(session) -> list[list[int]]:
    return f1_parts(session, "search")


def test_f1(session) -> list[list[int]]:
    return f1_parts(session, "test")


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
