"""A real small CNN where INT8 rarely pays on a CPU: the PP-OCR text-line orientation classifier.

    pip install rapidocr_onnxruntime          # the model ships inside the wheel
    qsearch optimize --config "$(python -m qsearch.examples.ocr_cls)" --budget 50

The model comes from the PyPI package `rapidocr_onnxruntime` (`ch_ppocr_mobile_v2.0_cls`: a
MobileNetV3-style CNN with hardswish on 48x192 crops, classes 0 and 180 degrees); nobody here
trained it. Its feature maps are tiny, so ONNX Runtime's int8 kernels spend more on Q/DQ glue
than they save (all-INT8 runs at 0.65-0.70x FP32 on 2-core CPUs): the workload on which qsearch
should conclude, quickly, that FP32 ships. Data: single text lines rendered from the offline
corpus with the DejaVu fonts, half of them turned upside down, preprocessed as RapidOCR does
(height 48, width min(192, 48 x aspect), scaled to [-1, 1], zero padding on the right).
Metric: top-1.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path

import numpy as np

from qsearch.examples import builder
from qsearch.examples.builder import finish, is_fresh
from qsearch.examples.corpus import sentences
from qsearch.examples.pages import fonts
from qsearch.files import atomic_write_bytes

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "ocr_cls"
HEIGHT, WIDTH = 48, 192
SPLITS = {"calib": 64, "search": 256, "test": 512}

WORKLOAD = builder.workload_yaml(
    "PP-OCR text-line orientation (0/180) from the rapidocr_onnxruntime wheel (written by qsearch.examples.ocr_cls)",
    "ppocr_cls", "top1", "0.01", batch_size=32, latency_batch=8, labels=True)


def model_path() -> Path:
    return builder.wheel_file("rapidocr_onnxruntime", "rapidocr_onnxruntime",
                              "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text-line orientation")


def sample(rng: np.random.Generator, text: str, font_files: list[str]) -> tuple[np.ndarray, int]:
    """One line of 2-12 words at a random size, ink and paper; upside down (label 1) half the time."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_files[rng.integers(len(font_files))], int(rng.integers(20, 40)))
    words = text.split()
    line = " ".join(words[: int(rng.integers(2, 13))])
    left, top, right, bottom = font.getbbox(line)
    pad = int(rng.integers(2, 10))
    paper = tuple(int(v) for v in rng.integers(170, 256, 3))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), line, font=font,
                             fill=tuple(int(v) for v in rng.integers(0, 110, 3)))
    label = int(rng.integers(2))
    if label:
        img = img.rotate(180)
    w = min(WIDTH, math.ceil(HEIGHT * img.width / img.height))
    a = np.asarray(img.resize((w, HEIGHT), Image.BILINEAR), np.float32)
    a = np.clip(a + rng.normal(0, rng.uniform(0, 12), (HEIGHT, w, 1)), 0, 255) / 255.0
    x = np.zeros((3, HEIGHT, WIDTH), np.float32)
    x[:, :, :w] = ((a - 0.5) / 0.5).transpose(2, 0, 1)
    return x, label


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and render the three splits into `out` (cached); returns workload.yaml."""
    blob = model_path().read_bytes()
    key = hashlib.sha256(blob + repr((SPLITS, HEIGHT, WIDTH)).encode() + b"cls-lines-v1").hexdigest()[:16]
    if not force and is_fresh(out, key):
        return out / "workload.yaml"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    text, font_files = sentences(), fonts()
    lines = itertools.cycle(text)
    builder.labelled_splits(out, SPLITS, lambda: sample(rng, next(lines), font_files))
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
