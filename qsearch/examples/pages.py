"""Synthetic document pages: corpus text drawn with the DejaVu fonts, with the text-line boxes.

The real document models (`orientation.py`, `ocr_det.py`) need pages whose truth is known without
labelling: the renderer knows each line's box, and a rotation it applied is the orientation label.
Fonts come from Debian's `fonts-dejavu-core` (or `QSEARCH_FONTS`); nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsearch.errors import QsearchError
from qsearch.examples.corpus import sentences

FONT_DIRS = (os.environ.get("QSEARCH_FONTS", ""), "/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu")


def fonts() -> list[str]:
    for d in FONT_DIRS:
        if d and Path(d).is_dir():
            found = sorted(str(p) for p in Path(d).glob("DejaVu*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name)
            if found:
                return found
    raise QsearchError("no DejaVu fonts found (apt-get install fonts-dejavu-core, or set QSEARCH_FONTS to a folder)")


@dataclass(frozen=True)
class Page:
    image: object  # PIL.Image.Image, RGB
    boxes: tuple[tuple[int, int, int, int], ...]  # text-line boxes (left, top, right, bottom)


class PageRenderer:
    """Deterministic pages for a seed: dense or sparse text, varied fonts, sizes, ink and paper.
    `hard`: small type, faint ink on grey paper, heavy noise (what a phone camera gives)."""

    def __init__(self, seed: int = 0, hard: bool = False):
        from PIL import ImageFont

        self.rng = np.random.default_rng(seed)
        self.hard = hard
        self.text = sentences()
        self.fonts = fonts()
        self._font = lambda path, size: ImageFont.truetype(path, size)

    def page(self, width: int, height: int) -> Page:
        from PIL import Image, ImageDraw

        r = self.rng
        paper = tuple(int(v) for v in r.integers(*((150, 215) if self.hard else (200, 256)), 3))
        img = Image.new("RGB", (width, height), paper)
        d = ImageDraw.Draw(img)
        font = self._font(self.fonts[r.integers(len(self.fonts))], int(r.integers(*((8, 15) if self.hard else (10, 24)))))
        ink = tuple(int(v) for v in r.integers(*((50, 130) if self.hard else (0, 90)), 3))
        lines = int(r.integers(2, 30))  # sparse notes to dense pages
        y, k, boxes = int(r.integers(2, height // 4)), int(r.integers(len(self.text))), []
        while y < height - font.size and len(boxes) < lines:
            x = int(r.integers(2, max(3, width // 6)))
            words = self.text[k % len(self.text)].split()
            s = " ".join(words[: int(r.integers(2, len(words) + 1))])
            d.text((x, y), s, font=font, fill=ink)
            box = d.textbbox((x, y), s, font=font)
            boxes.append((box[0], box[1], min(box[2], width - 1), min(box[3], height - 1)))
            k += 1
            y += int(font.size * r.uniform(1.25, 2.2))
        a = np.asarray(img, np.float32) + r.normal(0, r.uniform(*((8, 24) if self.hard else (0, 12))), (height, width, 1))
        return Page(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), tuple(boxes))


def normalize(img, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32, ImageNet normalization (what PaddleOCR's models expect)."""
    a = np.asarray(img, np.float32) / 255.0
    return ((a - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).astype(np.float32)
