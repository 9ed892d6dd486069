"""A real 243-layer CNN + transformer: the PP-OCRv4 text recognizer (SVTR neck, CTC head, opset 12).

    pip install rapidocr_onnxruntime          # the model ships inside the wheel
    qsearch optimize --config "$(python -m qsearch.examples.ocr_rec)" --budget 50

The model comes from the PyPI package `rapidocr_onnxruntime` (PP-OCRv4 mobile recognizer: a
PP-LCNet-style CNN with hardswish, then SVTR attention blocks with LayerNorm written out, and a
CTC classifier over 6625 characters); nobody here trained it. Data: single text lines rendered
from the offline corpus with the DejaVu fonts (varied size, ink, paper, noise), preprocessed as
RapidOCR does (height 48, width 320, scaled to [-1, 1], right padding). Metric: character accuracy
of greedy CTC decoding, 1 - edit distance / characters over the split, returned as per-line parts
(characters right, characters) so qsearch can bootstrap how finely the split resolves it.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from qsearch.examples import builder
from qsearch.examples.builder import finish, is_fresh
from qsearch.examples.corpus import sentences
from qsearch.examples.pages import fonts
from qsearch.files import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "ocr_rec"
HEIGHT, WIDTH = 48, 320
SPLITS = {"calib": 64, "search": 160, "test": 320}

WORKLOAD = builder.workload_yaml(
    "PP-OCRv4 text recognizer from the rapidocr_onnxruntime wheel (written by qsearch.examples.ocr_rec)",
    "ppocrv4_rec", '{search: "qsearch.examples.ocr_rec:search_accuracy", test: "qsearch.examples.ocr_rec:test_accuracy"}',
    "0.005", batch_size=16, latency_batch=8)


def model_path() -> Path:
    return builder.wheel_file("rapidocr_onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "OCR recognizer")


def charset(model_file: Path) -> list[str]:
    """CTC classes as RapidOCR decodes them: blank, the model's `character` metadata, a space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_file), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def render_line(rng: np.random.Generator, text: str, font_files: list[str]) -> tuple[np.ndarray, str]:
    """One text line drawn at a random size, ink and paper, cut to what fits in WIDTH at height 48."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_files[rng.integers(len(font_files))], int(rng.integers(22, 34)))
    words, line = text.split(), ""
    for w in words:
        trial = f"{line} {w}".strip()
        if font.getlength(trial) > WIDTH - 12:
            break
        line = trial
    line = line or words[0][:8]
    paper = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 100, 3))
    img = Image.new("RGB", (WIDTH, HEIGHT), paper)
    d = ImageDraw.Draw(img)
    left, top, right, bottom = d.textbbox((0, 0), line, font=font)
    d.text((int(rng.integers(2, 8)), (HEIGHT - (bottom - top)) // 2 - top), line, font=font, fill=ink)
    a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 10), (HEIGHT, WIDTH, 1))
    a = np.clip(a, 0, 255) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32), line


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Copy the model and render the splits (lines + their text) into `out`; returns workload.yaml."""
    blob = model_path().read_bytes()
    key = hashlib.sha256(blob + repr((SPLITS, HEIGHT, WIDTH)).encode() + b"lines-v1").hexdigest()[:16]
    wl = out / "workload.yaml"
    if not force and is_fresh(out, key):
        return wl
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    text, font_files = sentences(), fonts()
    k = 0
    for name, n in SPLITS.items():
        xs, lines = [], []
        for _ in range(n):
            x, line = render_line(rng, text[k % len(text)], font_files)
            xs.append(x)
            lines.append(line)
            k += 1
        np.savez(out / f"{name}.npz", x=np.stack(xs))
        atomic_write_text(out / f"{name}.txt", "\n".join(lines) + "\n")
    atomic_write_bytes(out / "model.onnx", blob)
    return finish(out, WORKLOAD, key)


@lru_cache(maxsize=4)
def _split(name: str, folder: str) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    d = Path(folder)
    lines = tuple((d / f"{name}.txt").read_text().splitlines())
    return np.load(d / f"{name}.npz")["x"], lines, tuple(charset(d / "model.onnx"))


def decode(probs: np.ndarray, chars: tuple[str, ...]) -> list[str]:
    """Greedy CTC: best class per step, repeats merged, blanks (class 0) dropped."""
    best = probs.argmax(-1)
    out = []
    for seq in best:
        keep = np.concatenate([[True], seq[1:] != seq[:-1]]) & (seq != 0)
        out.append("".join(chars[i] for i in seq[keep] if i < len(chars)))
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def accuracy_parts(session, split: str, folder: Path | None = None) -> list[list[float]]:
    """Per line: (characters right = length - edit distance, floored at 0; characters)."""
    x, lines, chars = _split(split, str(folder or Path(os.environ.get("QSEARCH_OCR_REC", DEFAULT_OUT))))
    name = session.get_inputs()[0].name
    parts = []
    for i in range(0, len(x), 16):
        for pred, truth in zip(decode(session.run(None, {name: x[i: i + 16]})[0], chars), lines[i: i + 16]):
            parts.append([max(0, len(truth) - edit_distance(pred, truth)), len(truth)])
    return parts


def search_accuracy(session) -> list[list[float]]:
    return accuracy_parts(session, "search")


def test_accuracy(session) -> list[list[float]]:
    return accuracy_parts(session, "test")


def main() -> None:
    builder.main(build, __doc__, DEFAULT_OUT, "render")


if __name__ == "__main__":
    main()
