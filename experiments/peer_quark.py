"""AMD Quark's auto-search (`quark.onnx.AutoSearchPro`, Optuna TPE) on a qsearch workload, run in its
own virtual environment (its pins differ from ours) by `bench_peers.py --quark`:

    python3 -m venv experiments/.venv-quark
    experiments/.venv-quark/bin/pip install -c constraints.txt torch==2.13.0
    experiments/.venv-quark/bin/pip install -c constraints.txt amd-quark onnxruntime rapidocr_onnxruntime
    PYTHONPATH=. experiments/.venv-quark/bin/python experiments/peer_quark.py WORKLOAD_DIR OUT_DIR --metric MOD:FN

Quark's search space here is its A8W8 preset adapted to ONNX Runtime's x86 CPU kernels (uint8
asymmetric activations, int8 symmetric weights, as qsearch writes): stage 1 a grid over activation
calibration (MinMax, Percentile, MinMSE), weight granularity (tensor, channel) and CLE (on, off);
stage 2 TPE over AdaRound / AdaQuant (iterations, learning rate) from the best calibration, on the
CPU. Its objective is the user's metric drop on the search split (it minimizes the drop; it does
not search mixed precision or latency). Every quantized model is one evaluation. Writes
OUT_DIR/quark.onnx (the best model so far) and OUT_DIR/quark.json (scores, evaluations, seconds,
whether the search finished) after every evaluation, so a run stopped at its time cap still
reports what it found.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Reader:
    """Quark's calibration data reader: one sample per call, from the workload's calib.npz."""

    def __init__(self, x: np.ndarray, name: str):
        self.x, self.name, self.i = x, name, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1: self.i]}

    def rewind(self):
        self.i = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", type=Path, help="a built workload folder: model.onnx, calib.npz")
    ap.add_argument("out", type=Path)
    ap.add_argument("--metric", required=True, help="module:function(session) -> number or per-sample parts")
    ap.add_argument("--model", type=Path, help="the float model to quantize (default: WORKLOAD_DIR/model.onnx); "
                                               "bench_peers.py passes qsearch's prepared graph, as to every peer")
    ap.add_argument("--trials", type=int, default=20, help="stage-2 (AdaRound/AdaQuant) trials, Quark's default")
    args = ap.parse_args()
    from quark.onnx.quantization.auto_search import AutoSearchPro

    mod, fn = args.metric.split(":")
    score_fn = getattr(importlib.import_module(mod), fn)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {"evaluations": 0, "best": None, "fp32": None, "t0": time.perf_counter(), "log": []}

    def score(model_path: str) -> float:
        """Quark's custom evaluator; every quantized model it scores is logged and the best so far
        kept as quark.onnx, so a run stopped at its time cap still reports what it found."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        v = score_fn(ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"]))
        if isinstance(v, (list, tuple, np.ndarray)):
            a = np.asarray(v, float)
            v = float(a[:, 0].sum() / a[:, 1].sum())
        if state["fp32"] is None:  # Quark scores the float model first
            state["fp32"] = float(v)
            return float(v)
        state["evaluations"] += 1
        state["log"].append({"model": Path(model_path).name, "score": float(v),
                             "seconds": round(time.perf_counter() - state["t0"], 1)})
        if state["best"] is None or v > state["best"]:
            state["best"] = float(v)
            shutil.copy(model_path, args.out / "quark.onnx")
        (args.out / "quark.json").write_text(json.dumps({
            "fp32_search": state["fp32"], "best_search": state["best"], "evaluations": state["evaluations"],
            "seconds": round(time.perf_counter() - state["t0"], 1), "finished": False, "log": state["log"]}, indent=1))
        return float(v)

    model = args.model or args.workload / "model.onnx"
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.load(args.workload / "calib.npz")["x"]
    work = args.out / "quark-work"
    shutil.rmtree(work, ignore_errors=True)
    config = {
        "search_space": {
            "activation": ["UInt8Spec"],
            "activation_params": {"symmetric": [False], "calibration_method": ["MinMax", "Percentile", "MinMSE"],
                                  "only_if": "activation"},
            "weight": ["Int8Spec"],
            "weight_params": {"symmetric": [True], "calibration_method": ["MinMax"],
                              "quant_granularity": ["Tensor", "Channel"], "only_if": "weight"},
            "cle_algo": ["cle", None],
            "cle_params": {"cle_steps": [1], "only_if": {"cle_algo": "cle"}},
            "algorithms": ["adaround", "adaquant"],
            "adaround_params": {"num_iterations": {"type": "int", "low": 1000, "high": 5000, "step": 1000},
                                "learning_rate": {"type": "float", "low": 1e-2, "high": 1e-1, "log": True},
                                "optim_device": ["cpu"], "infer_device": ["cpu"], "batch_size": [2],
                                "early_stop": [True], "only_if": {"algorithms": "adaround"}},
            "adaquant_params": {"num_iterations": {"type": "int", "low": 1000, "high": 5000, "step": 1000},
                                "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
                                "optim_device": ["cpu"], "infer_device": ["cpu"], "batch_size": [2],
                                "early_stop": [True], "only_if": {"algorithms": "adaquant"}},
            "OptimizeModel": [True],
        },
        "n_trials": args.trials, "n_jobs": 1, "output_dir": str(work / "output"), "temp_dir": str(work / "temp"),
        "search_algo": "TPE", "search_evaluator": score, "direction": "minimize", "base_framework": "onnx",
        "study_storage_db": "auto_search.db", "load_study_if_exists": False, "study_name": "AutoSearch",
        "model_input": str(model), "calib_data_reader": Reader(x, name), "two_stage_search": True,
    }
    best = AutoSearchPro(config).run()
    (args.out / "quark.json").write_text(json.dumps({
        "fp32_search": state["fp32"], "best_search": state["best"], "evaluations": state["evaluations"],
        "seconds": round(time.perf_counter() - state["t0"], 1), "finished": True, "best_params": best,
        "log": state["log"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
