"""AIMET-ONNX's post-training recovery, all-INT8, in its own virtual environment (see
`peer_aimet.py` for the set-up), for `bench_recovery_peers.py`:

    PYTHONPATH=. experiments/.venv-aimet/bin/python experiments/peer_aimet_ptq.py MODEL CALIB_NPZ OUT \
        --technique cle+adaround

AIMET's documented recipe: cross-layer equalization on the float model (`equalize_model`, which
folds BatchNorm, scales pairs and absorbs high biases), a W8A8 QuantizationSimModel with its
default configuration, then AdaRound (`apply_adaround`, AIMET's recommended 10000 iterations per
layer unless `--iterations` says otherwise) or Sequential MSE (`apply_seq_mse`, 20 candidates),
then `compute_encodings` on the calibration data and an ONNX QDQ export. Every input array of the
npz whose name the model takes is fed. Writes OUT/aimet.onnx and OUT/aimet.json (seconds).
"""

from __future__ import annotations

import json
import time

import onnx
from peer_ptq_common import parse


def main() -> None:
    def extra(ap):
        ap.add_argument("--iterations", type=int, default=10000, help="AdaRound steps per layer (AIMET's default)")
        ap.add_argument("--batch", type=int, default=8)

    args, model, arrays = parse("cle, adaround, seqmse", "cle+adaround", extra)
    from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse
    from aimet_onnx.cross_layer_equalization import equalize_model

    t0 = time.perf_counter()
    n = len(next(iter(arrays.values())))
    calib = [{k: v[i: i + args.batch] for k, v in arrays.items()} for i in range(0, n, args.batch)]
    techniques = set(args.technique.split("+"))
    if "cle" in techniques:
        equalize_model(model)
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               providers=["CPUExecutionProvider"])
    if "seqmse" in techniques:
        apply_seq_mse(sim, calib)
    if "adaround" in techniques:
        apply_adaround(sim, calib, num_iterations=args.iterations)
    sim.compute_encodings(calib)
    onnx.save(sim.to_onnx_qdq(export_int32_bias=True), str(args.out / "aimet.onnx"))
    (args.out / "aimet.json").write_text(json.dumps({"technique": args.technique, "iterations": args.iterations,
                                                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
