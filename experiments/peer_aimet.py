"""AIMET-ONNX's automatic mixed precision (AMP) on a qsearch workload, in its own virtual
environment (it pins its own onnx/onnxruntime stack), for `bench_peers.py`:

    python3 -m venv experiments/.venv-aimet
    experiments/.venv-aimet/bin/pip install -c constraints.txt torch==2.13.0
    experiments/.venv-aimet/bin/pip install -c constraints.txt aimet-onnx rapidocr_onnxruntime
    PYTHONPATH=. experiments/.venv-aimet/bin/python experiments/peer_aimet.py WORKLOAD_DIR OUT_DIR \
        --metric MOD:FN --max-drop 0.005

AIMET's recipe as its documentation gives it: a QuantizationSimModel (W8A8, min-max encodings from
the calibration split), per-quantizer-group sensitivity for each candidate precision
(`analyze_mixed_precision_sensitivity`, scored on `--phase1` samples as AIMET suggests for phase 1:
the outputs' SQNR against FP32, since the user's metric owns its whole split), then `apply_amp` with the accuracy budget as its acceptance test
on the whole search split. Candidates: W8A8 and W16A16 (what AIMET offers; ONNX Runtime's CPU
provider has no int16 kernels, so W16A16 groups run as float between int16 Q/DQ). The result is
exported as ONNX QDQ (`to_onnx_qdq`, uint8 activations, int32 bias). Writes OUT_DIR/aimet.onnx
and OUT_DIR/aimet.json (evaluations, seconds, the precisions chosen).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", type=Path, help="a built workload folder: model.onnx, calib.npz")
    ap.add_argument("out", type=Path)
    ap.add_argument("--metric", required=True, help="module:function(session) -> number or per-sample parts")
    ap.add_argument("--model", type=Path, help="the float model to quantize (default: WORKLOAD_DIR/model.onnx); "
                                               "bench_peers.py passes qsearch's prepared graph, as to every peer")
    ap.add_argument("--max-drop", type=float, required=True, help="the accuracy budget (absolute, metric units)")
    ap.add_argument("--phase1", type=int, default=16, help="samples for the per-group sensitivity (phase 1)")
    args = ap.parse_args()
    from aimet_onnx.mixed_precision import analyze_mixed_precision_sensitivity, apply_amp, w8a8, w16a16
    from aimet_onnx.quantsim import QuantizationSimModel

    mod, fn = args.metric.split(":")
    score_fn = getattr(importlib.import_module(mod), fn)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {"evaluations": 0, "t0": time.perf_counter()}

    def score(session) -> float:
        state["evaluations"] += 1
        v = score_fn(session)
        if isinstance(v, (list, tuple, np.ndarray)):
            a = np.asarray(v, float)
            return float(a[:, 0].sum() / a[:, 1].sum())
        return float(v)

    model = onnx.load(str(args.model or args.workload / "model.onnx"))
    x = np.load(args.workload / "calib.npz")["x"]
    import onnxruntime as ort

    name = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    fp32 = score(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))
    calib = [{name: x[i: i + 8]} for i in range(0, len(x), 8)]
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               providers=["CPUExecutionProvider"])
    sim.compute_encodings(calib)
    probe = {name: x[: args.phase1]}
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, probe)

    def fidelity(session) -> float:
        """Phase 1's score on a few samples, as AIMET suggests: the outputs' SQNR against FP32 (dB)."""
        state["evaluations"] += 1
        out = session.run(None, probe)
        sig = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in reference)
        noise = sum(float(np.sum(np.square(o.astype(np.float64) - r))) for o, r in zip(out, reference))
        return 10 * np.log10(max(sig, 1e-30) / max(noise, 1e-30))

    sens = analyze_mixed_precision_sensitivity(sim, [w8a8, w16a16], fidelity, calib)
    apply_amp(sim, sens, lambda session: score(session) >= fp32 - args.max_drop)
    qdq = sim.to_onnx_qdq(export_int32_bias=True)
    onnx.save(qdq, str(args.out / "aimet.onnx"))
    (args.out / "aimet.json").write_text(json.dumps({
        "fp32_search": fp32, "evaluations": state["evaluations"] - 1,
        "seconds": round(time.perf_counter() - state["t0"], 1), "finished": True}, indent=1))


if __name__ == "__main__":
    main()
