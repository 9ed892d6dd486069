"""Offline English text for the example workloads: first sentences of standard-library docstrings.

A fixed, license-clean corpus that needs no download: the MiniLM workload embeds it, the page
renderer (`pages.py`) draws it with the DejaVu fonts for the document-image models.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

import numpy as np

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
