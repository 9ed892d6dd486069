"""A latency hook times plans on the user's device: ONNX Runtime scores accuracy here, the hook
gives seconds per batch. The planted hook runs ONNX Runtime in a subprocess of its own (as a hook
reaching a board over ssh would) and adds a planted delay per op type: float Conv slow and int8
Conv fast, int8 Gemm slow and float Gemm fast. The plan must put INT8 exactly where it pays there."""

from __future__ import annotations

import pytest

import qsearch
from qsearch.cli import main

from .conftest import last_error, make_cnn, write_workload

HOOK = '''
import subprocess, sys

CHILD = r"""
import sys, time
import numpy as np, onnx, onnxruntime as ort
sessions = {}
for line in sys.stdin:
    model_path, feeds_path = line.rstrip("\\n").split("\\t")
    if model_path not in sessions:
        m = onnx.load(model_path)
        dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # (its CPU time is then its run time)
        delay = 0.0
        for n in m.graph.node:
            int8 = len(n.input) > 1 and n.input[1] in dq
            delay += {"Conv": 0.001 if int8 else 0.006, "Gemm": 0.008 if int8 else 0.001}.get(n.op_type, 0.0)
        sessions[model_path] = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"]), delay
    sess, delay = sessions[model_path]
    feeds = dict(np.load(feeds_path))
    t = time.process_time()  # CPU time: a busy CI machine cannot move the planted device
    sess.run(None, feeds)
    print(time.process_time() - t + delay, flush=True)
"""
_child = None


def measure(model_path, feeds_path):
    global _child
    if _child is None or _child.poll() is not None:
        _child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
    _child.stdin.write(f"{model_path}\\t{feeds_path}\\n")
    _child.stdin.flush()
    return float(_child.stdout.readline())


def nan(model_path, feeds_path):
    return float("nan")


def zero(model_path, feeds_path):
    return 0


def negative(model_path, feeds_path):
    return -0.01


def words(model_path, feeds_path):
    return "fast"


def boom(model_path, feeds_path):
    raise RuntimeError("device offline")


def hang(model_path, feeds_path):
    import time
    time.sleep(60)
'''


def _workload(tmp_path, hook: str, **kw):
    cfg = write_workload(tmp_path / "w", make_cnn(), n=64, max_drop="0.1", **kw)
    (cfg.parent / "planted_hook.py").write_text(HOOK)
    cfg.write_text(cfg.read_text() + f"runtime: {{latency: \"{hook}\"}}\n")
    return cfg


def test_the_plan_follows_the_devices_latency_not_this_machines(tmp_path):
    cfg = _workload(tmp_path, "planted_hook:measure")
    r = qsearch.optimize(cfg, budget=12, out=tmp_path / "out")
    assert r.status == 0
    int8 = {n for n, c in r.plan.layers.items() if c.quantized}
    assert {"conv_a", "conv_b"} <= int8 and "fc" not in int8, int8  # 5 ms saved each; int8 Gemm costs 7 ms more
    assert r.speedup > 1.5  # the planted device: FP32 ~13 ms, the plan ~3 ms
    assert r.plan.provenance["latency_hook"] == "planted_hook:measure"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "measured by the hook planted_hook:measure" in report and "int8 arithmetic may round differently" in report
    profile = (tmp_path / "out" / "sensitivity.yaml").read_text()
    assert "region_calls:" in profile
    # `evaluate` times through the hook too, and says so
    r2 = qsearch.evaluate(tmp_path / "out" / "model.qsearch.onnx", cfg, out=tmp_path / "eval")
    assert r2.fp32_latency_ms / r2.latency_ms > 1.5


@pytest.mark.parametrize("hook, said", [
    ("no_such_module:measure", "cannot import 'no_such_module'"),
    ("planted_hook:missing", "has no function 'missing'"),
    ("planted_hook:nan", "returned nan"),
    ("planted_hook:zero", "returned 0"),
    ("planted_hook:negative", "returned -0.01"),
    ("planted_hook:words", "returned 'fast'"),
    ("planted_hook:boom", "raised RuntimeError: device offline"),
    ("planted_hook:hang", "ran past --eval-timeout 1 s"),
    ("not a hook", "runtime.latency must be a latency hook 'package.module:function'"),
])
def test_a_bad_hook_is_one_line_naming_the_key_before_any_analysis(hook, said, tmp_path, capsys):
    cfg = _workload(tmp_path, hook)
    out = tmp_path / "out"
    assert main(["analyze", "--config", str(cfg), "--out", str(out), "--eval-timeout", "1"]) == 2
    line = last_error(capsys)
    assert said in line and "runtime.latency" in line, line
    assert not (out / "sensitivity.yaml").exists()


NPU_DELAY = '''
        inits = {i.name: i.data_type for i in m.graph.initializer}
        wide = {o for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[2]) == 4
                for o in n.output}
        delay = sum(0.001 if n.input[0] in wide else 0.006 for n in m.graph.node if n.op_type == "Conv")
'''


def test_an_npu_plan_follows_the_devices_latency_not_bit_operations(tmp_path):
    """A planted NPU on which a Conv reading uint16 codes is fast and one reading uint8 codes (or
    float) slow: with the hook, target npu searches on the device's time, and both Convs go int16,
    which bit-operations alone (int16 costs twice INT8's) would never choose."""
    cfg = write_workload(tmp_path / "w", make_cnn(opset=21), n=64, max_drop="0.1",
                         extra="target: npu\nsearch_space: {extends: npu}\n")
    start = HOOK.index("        delay = 0.0")
    end = HOOK.index("        sessions[model_path] =")
    # a module name of its own: `planted_hook`, imported by the tests above, stays in sys.modules
    (cfg.parent / "npu_hook.py").write_text(HOOK[:start] + NPU_DELAY.lstrip("\n") + HOOK[end:])
    cfg.write_text(cfg.read_text() + 'runtime: {latency: "npu_hook:measure"}\n')
    r = qsearch.optimize(cfg, budget=12, out=tmp_path / "out")
    assert r.status == 0
    assert {n for n, c in r.plan.layers.items() if c.precision == "int16"} >= {"conv_a", "conv_b"}, r.plan.layers
    assert r.speedup > 2  # the planted device: ~12 ms for the float Convs, ~2 ms for int16 ones
