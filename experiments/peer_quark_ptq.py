"""AMD Quark's post-training recovery, all-INT8, in its own virtual environment (see `peer_quark.py`
for the set-up), for `bench_recovery_peers.py`:

    PYTHONPATH=. experiments/.venv-quark/bin/python experiments/peer_quark_ptq.py MODEL CALIB_NPZ OUT \
        --technique cle+adaround

Quark's QConfig API with the layout ONNX Runtime's x86 kernels run (uint8 asymmetric activations,
int8 symmetric weights, MinMax ranges, per-channel weights) and its algorithms: cross-layer
equalization (`CLEConfig`), SmoothQuant (`SmoothQuantConfig`, alpha 0.5) and AdaRound
(`AdaRoundConfig`, Quark's defaults: 1000 iterations per layer, on the CPU). Every input array of
the npz whose name the model takes is fed, one sample per call. Writes OUT/quark.onnx and
OUT/quark.json (seconds).
"""

from __future__ import annotations

import json
import time

import numpy as np
from peer_ptq_common import parse


class Reader:
    """Quark's calibration reader: one sample per call."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.i = arrays, 0
        self.n = len(next(iter(arrays.values())))

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1: self.i] for k, v in self.arrays.items()}

    def rewind(self):
        self.i = 0


def main() -> None:
    args, model, arrays = parse("cle, smoothquant, adaround", "cle+adaround")
    from quark.onnx import ModelQuantizer, QConfig
    from quark.onnx.quantization.config.algorithm import AdaRoundConfig, CLEConfig, SmoothQuantConfig
    from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec

    t0 = time.perf_counter()
    algos = {"cle": CLEConfig, "smoothquant": SmoothQuantConfig, "adaround": lambda: AdaRoundConfig(
        optim_device="cpu", infer_device="cpu")}
    config = QConfig(global_config=QLayerConfig(
        activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
        weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)),
        algo_config=[algos[t]() for t in args.technique.split("+")])
    ModelQuantizer(config).quantize_model(str(args.model), str(args.out / "quark.onnx"), Reader(arrays))
    (args.out / "quark.json").write_text(json.dumps({"technique": args.technique,
                                                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
