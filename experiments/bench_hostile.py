"""This round's hostile sweep, before and after: every case a real `qsearch` command in its own
process, classified by what a user sees (a traceback, a hang, a one-line refusal, a run that says
what it changed, a silent run). Classes: recovery on odd graphs, figures a plan only displays,
a plan's recorded int8 path, PyTorch modules in narrow dtypes, the FP16 target with hardswish,
this round's settings and environment variables.

    python experiments/bench_hostile.py --before c28738a    # writes hostile_round4.md

`--before` checks that commit out into a temporary worktree and runs the same cases on it
(PYTHONPATH first), in the same run, on the same machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import make_cnn, write_workload  # noqa: E402  (the tests' small models)
from tests.test_fp16_hardswish import hardswish_cnn  # noqa: E402
from tests.test_recovery_properties import workload as dense_workload  # noqa: E402


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    expect: str = "run"  # run | refuse | say: what a mature tool does with it
    said: str = ""  # for `say`: a phrase the one-line note must hold


def odd_graphs(tmp: Path) -> list[Case]:
    """Gemm/MatMul shapes recovery must handle: a 2-D C (fused MatMul + Add of a (1, N) bias),
    a computed C, no bias, a 1-D bias, mixed-dtype inputs; each optimized with every technique."""
    from onnx import TensorProto, helper, numpy_helper

    out = []
    for kind in ("bias_2d", "bias_computed", "no_bias", "bias_1d"):
        rng = np.random.default_rng(0)
        inits = {"emb": rng.normal(0, 1, (20, 8)), "w": rng.normal(0, 0.4, (16, 8)), "w2": rng.normal(0, 0.4, (8, 4)),
                 "b": rng.normal(0, 0.2, (1, 8) if kind == "bias_2d" else (8,))}
        head = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
                helper.make_node("ReduceMean", ["e"], ["em"], name="em", axes=[1], keepdims=0),
                helper.make_node("Concat", ["x", "em"], ["h"], name="cat", axis=1)]
        if kind == "bias_computed":  # C is an activation: ReduceMean of the features, broadcast
            body = [helper.make_node("ReduceMean", ["x"], ["c"], name="c_of_x", axes=[1], keepdims=1),
                    helper.make_node("Gemm", ["h", "w", "c"], ["a"], name="gemm")]
        elif kind == "no_bias":
            body = [helper.make_node("Gemm", ["h", "w"], ["a"], name="gemm")]
        else:
            body = [helper.make_node("MatMul", ["h", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["a"], name="add")]
        nodes = head + body + [helper.make_node("Relu", ["a"], ["r"], name="relu"),
                               helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
        used = {t for n in nodes for t in n.input}
        graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                                helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                                  [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items() if k in used])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        d = tmp / f"odd_{kind}"
        d.mkdir()
        cfg = dense_workload(d, model)
        cfg.write_text(cfg.read_text().replace("recovery: [bias, cle, smooth]", "recovery: [bias, cle, smooth], "
                                              "early_verdict: false"))
        out.append(Case("recovery on odd graphs (optimize)", kind,
                        ("optimize", "--config", str(cfg), "--budget", "4", "--out", str(d / "out"))))
    return out


def plan_fields(tmp: Path, base_cfg: Path) -> list[Case]:
    """A plan's displayed figures and recorded int8 path, hand-edited."""
    plan = tmp / "naive.yaml"
    subprocess.run([sys.executable, "-m", "qsearch", "baseline", "naive", "--config", str(base_cfg), "--out",
                    str(tmp / "ob"), "-o", str(plan)], check=True, capture_output=True, env=ENV, cwd=tmp)
    doc = yaml.safe_load(plan.read_text())
    good = {"metric": "top1", "plan": {"test": 0.9, "latency_ms": 1.0, "size_bytes": 50},
            "fp32": {"test": 0.95, "latency_ms": 2.0, "size_bytes": 100}}
    out = []
    for i, value in enumerate(["0.93", [1, 2], {"a": 1}, None, True, float("nan"), float("inf"), 0, -1]):
        for side, key in (("plan", "test"), ("fp32", "latency_ms"), ("plan", "size_bytes")):
            p = tmp / f"metrics_{i}_{side}_{key}.yaml"
            p.write_text(yaml.safe_dump({**doc, "metrics": {**good, side: {**good[side], key: value}}}, sort_keys=False))
            out.append(Case("figures a plan only displays (show)", f"{side}.{key}={value!r}", ("show", str(p))))
    for value in ([1, 2], 5, "z80", {"a": 1}):
        p = tmp / f"path_{value!s:.8}.yaml".replace(" ", "")
        p.write_text(yaml.safe_dump({**doc, "provenance": {**doc["provenance"], "int8_path": value}}, sort_keys=False))
        out.append(Case("a plan's recorded int8 path (apply)", repr(value),
                        ("apply", str(p), str(base_cfg.parent / "model.onnx"), "-o", str(p.with_suffix(".onnx"))),
                        expect="say", said="int8 path"))
    return out


TORCH_FACTORIES = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build_bf16():
    torch.manual_seed(0)
    return Net().to(torch.bfloat16)


def build_fp16():
    torch.manual_seed(0)
    return Net().half()


def build_meta():
    with torch.device("meta"):
        return Net()
'''


def torch_dtypes(tmp: Path, base_cfg: Path) -> list[Case]:
    (tmp / "narrow.py").write_text(TORCH_FACTORIES)
    out = []
    for factory, expect, said in (("build_bf16", "say", "bfloat16"), ("build_fp16", "say", "float16"),
                                  ("build_meta", "refuse", "meta device")):
        cfg = tmp / f"{factory}.yaml"
        text = base_cfg.read_text().replace("model: model.onnx", f"model: {{torch: 'narrow:{factory}', "
                                            "example_input: [1, 3, 8, 8]}")
        for split in ("calib", "search", "test"):
            text = text.replace(f"npz: {split}.npz", f"npz: {base_cfg.parent / split}.npz")
        cfg.write_text(text)
        out.append(Case("PyTorch modules in narrow dtypes (analyze)", factory,
                        ("analyze", "--config", str(cfg), "--out", str(tmp / f"o_{factory}")),
                        (("QSEARCH_CACHE", str(tmp / "cache")),), expect, said))
    return out


def fp16_hardswish(tmp: Path) -> list[Case]:
    out = []
    for form in ("paddle", "torch"):
        cfg = write_workload(tmp / f"hs_{form}", hardswish_cnn(form), n=64, max_drop="0.05", extra="target: fp16\n")
        out.append(Case("FP16 target with hardswish (optimize)", form,
                        ("optimize", "--config", str(cfg), "--budget", "3", "--out", str(cfg.parent / "out"))))
    return out


def settings(tmp: Path, base_cfg: Path) -> list[Case]:
    out = []
    for i, value in enumerate(("abc", "0", "99999", "-1")):
        out.append(Case("this round's settings and environment (optimize)", f"QSEARCH_HEARTBEAT_S={value}",
                        ("optimize", "--config", str(base_cfg), "--budget", "2", "--out", str(tmp / f"hb{i}")),
                        (("QSEARCH_HEARTBEAT_S", value),), "refuse"))
    for i, space in enumerate(("{stop_at_ceiling: 1}", "{stop_at_ceiling: maybe}", "{weights: [int9]}", "{weights: []}")):
        cfg = base_cfg.with_name(f"space{i}.yaml")
        cfg.write_text(base_cfg.read_text().replace("search_space: {extends: default, early_verdict: false}",
                                                    f"search_space: {{extends: default, early_verdict: false, {space[1:]}"))
        out.append(Case("this round's settings and environment (optimize)", space,
                        ("optimize", "--config", str(cfg), "--budget", "2", "--out", str(tmp / f"sp{i}")), expect="refuse"))
    return out


ENV = {**os.environ}


def run_case(case: Case, pythonpath: str | None) -> str:
    """traceback | hang | refused | said | ran | silent | failed: what the user sees."""
    env = {**ENV, **dict(case.env)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        # cwd outside the checkout: `python -m` puts the working directory first on sys.path
        r = subprocess.run([sys.executable, "-m", "qsearch", *case.argv], capture_output=True, text=True, env=env,
                           timeout=300, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return "hang"
    if "Traceback" in r.stderr:
        return "traceback"
    if r.returncode == 2:
        one = len([ln for ln in r.stderr.splitlines() if ln.startswith("qsearch: error")]) == 1
        return "refused" if one else "failed"
    if r.returncode != 0:
        return "failed"
    if case.said and case.said in r.stderr + r.stdout:
        return "said"
    return "ran" if case.expect == "run" else "silent"


def sweep(cases: list[Case], pythonpath: str | None) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for c in cases:
        row = table.setdefault(c.group, {})
        kind = run_case(c, pythonpath)
        row[kind] = row.get(kind, 0) + 1
        print(f"{'before' if pythonpath else 'after'}: {c.group} / {c.name}: {kind}", file=sys.stderr)
    return table


KINDS = ("traceback", "hang", "failed", "silent", "refused", "said", "ran")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="a commit to run the same cases on (a temporary worktree)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        base = write_workload(tmp / "base", make_cnn(), n=64)
        cases = [*odd_graphs(tmp), *plan_fields(tmp, base), *torch_dtypes(tmp, base), *fp16_hardswish(tmp),
                 *settings(tmp, base)]
        runs = {}
        if args.before:
            tree = tmp / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                           capture_output=True)
            try:
                runs[f"before ({args.before})"] = sweep(cases, str(tree))
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
                shutil.rmtree(tree, ignore_errors=True)
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        runs[f"after ({head.stdout.strip()})"] = sweep(cases, None)
    lines = [f"# Hostile inputs of round 4, before and after ({date.today()}, {platform.machine()}, {os.cpu_count()} cores)",
             "", f"{len(cases)} cases, each a `qsearch` command in its own process (`experiments/bench_hostile.py`). "
             "What the user sees: a traceback, a hang (300 s), `failed` (another exit or several error lines), "
             "`silent` (ran without saying what it changed or distrusted), `refused` (exit 2, one line), `said` (ran "
             "and said it in one line), `ran` (a valid input, handled).", ""]
    groups = list(dict.fromkeys(c.group for c in cases))
    lines += ["| class | cases | " + " | ".join(f"{run}: " + "/".join(KINDS) for run in runs) + " |",
              "|---|---:|" + "---|" * len(runs)]
    for g in groups:
        n = sum(c.group == g for c in cases)
        lines.append(f"| {g} | {n} | " + " | ".join("/".join(str(runs[r].get(g, {}).get(k, 0)) for k in KINDS)
                                                     for r in runs) + " |")
    (HERE / "hostile_round4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
