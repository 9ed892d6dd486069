"""Peer in the same run: NNCF's QAT (torch backend: `nncf.quantize`, then training) on the embedded
default CNN, with the data, loss, optimizer, epochs and early stopping `qsearch finetune` uses.
The PyTorch model is the FP32 ONNX model mirrored by onnx2torch (the CNN's training script keeps
no checkpoint). NNCF's defaults quantize every Conv/Linear (weights per channel, activations per
tensor): the same INT8 layers as the naive plan, per tensor and per channel. Appends to qat_digits.md.
Needs NNCF and, for `nncf.strip`, torchao (`pip install -c constraints.txt nncf torchao`).

    python experiments/peer_nncf_qat.py
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EPOCHS, LR, PATIENCE = 30, 1e-3, 6


def top1(model, data) -> float:
    import torch

    right = total = 0
    with torch.no_grad():
        for b, y in zip(data.batches, data.labels):
            out = model(torch.from_numpy(b["image"]))
            right += int((out.argmax(1).numpy() == y).sum())
            total += len(y)
    return right / total


def main() -> None:
    import nncf
    import torch
    from onnx import version_converter

    from qsearch.commands import open_bench
    from qsearch.progress import output
    from qsearch.qat import mirror

    mirror.require()
    import onnx2torch

    with output(quiet=True):
        bench = open_bench(None, Path("/tmp/qsearch-bench-qat"))
    class Net(torch.nn.Module):  # a plain module: NNCF takes an fx.GraphModule for its FX backend (needs torchao)
        def __init__(self):
            super().__init__()
            self.body = onnx2torch.convert(version_converter.convert_version(bench.prepared.proto, 17))

        def forward(self, x):
            return self.body(x)

    fp32 = Net().eval()
    lines = ["", "## Peer in the same run: NNCF QAT (torch backend)", "",
             f"NNCF {nncf.__version__}, torch {torch.__version__}; the FP32 ONNX model mirrored by onnx2torch as the "
             f"PyTorch model; `nncf.quantize` (every Conv/Linear INT8, as in the naive plan), then the same "
             f"distillation loss, inputs, Adam lr {LR:g}, up to {EPOCHS} epochs, patience {PATIENCE} on search top-1 "
             "(computed in torch on NNCF's fake-quantized model); the best model exported with `nncf.strip` and "
             "`torch.onnx.export` and scored by ONNX Runtime on this machine.", "",
             "| NNCF weights | PTQ test (torch) | QAT search (torch) | QAT test (torch) | QAT test (ONNX Runtime) | "
             "epochs | minutes |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for per_channel in (False, True):
        row, note = run(bench, Net, fp32, per_channel)
        lines.append(row)
        notes += [note] if note else []
    lines += ["", f"FP32 test top-1 (torch mirror) {top1(fp32, bench.test_data):.4f}.", *notes, ""]
    with open(HERE / "qat_digits.md", "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def run(bench, Net, fp32, per_channel: bool) -> tuple[str, str]:
    import nncf
    import onnx
    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from qsearch.qat.train import distillation

    student = Net()
    calib = [torch.from_numpy(b["image"]) for b in bench.calib_data.batches]
    t0 = time.perf_counter()
    adv = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(per_channel=per_channel))
    q = nncf.quantize(student, nncf.Dataset(calib), advanced_parameters=adv)
    ptq_s, ptq_t = top1(q, bench.search_data), top1(q, bench.test_data)
    inputs = [torch.from_numpy(b["image"]) for b in (*bench.calib_data.batches, *bench.search_data.batches)]
    with torch.no_grad():
        teacher = [fp32(x) for x in inputs]
    opt = torch.optim.Adam(q.parameters(), lr=LR)
    rng = np.random.default_rng(0)
    best, best_state, since, epochs = ptq_s, {k: v.clone() for k, v in q.state_dict().items()}, 0, 0
    for e in range(1, EPOCHS + 1):
        q.train()
        for i in rng.permutation(len(inputs)):
            loss = distillation([q(inputs[i])], [teacher[i]])
            opt.zero_grad()
            loss.backward()
            opt.step()
        q.eval()
        s = top1(q, bench.search_data)
        epochs = e
        if s > best:
            best, best_state, since = s, {k: v.clone() for k, v in q.state_dict().items()}, 0
        else:
            since += 1
            if since >= PATIENCE:
                break
    q.load_state_dict(best_state)
    qat_t = top1(q, bench.test_data)
    seconds = time.perf_counter() - t0
    ort_test, note = "", ""
    try:
        stripped = nncf.strip(q, example_input=calib[0])
        path = Path(f"/tmp/qsearch-bench-qat/nncf_qat_{'pc' if per_channel else 'pt'}.onnx")
        torch.onnx.export(stripped, (calib[0],), str(path), input_names=["image"], output_names=["y"], dynamo=False,
                          dynamic_axes={"image": {0: "n"}, "y": {0: "n"}})
        ort_test = f"{bench.test_scorer.score(bench.engine.session(onnx.load(path))):.4f}"
    except Exception as exc:
        note = f"ONNX export ({'per-channel' if per_channel else 'per-tensor'}) failed: {type(exc).__name__}: " \
               f"{str(exc).splitlines()[0][:200]}"
        traceback.print_exc()
    return (f"| {'per channel' if per_channel else 'per tensor'} | {ptq_t:.4f} | {best:.4f} | {qat_t:.4f} | "
            f"{ort_test or 'n/a'} | {epochs} | {seconds / 60:.2f} |"), note

if __name__ == "__main__":
    main()
