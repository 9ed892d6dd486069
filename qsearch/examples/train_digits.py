"""Train and export the embedded default workload: a MobileNet-style CNN on scikit-learn's digits.

Run once by the maintainers (`python -m qsearch.examples.train_digits`); its outputs ship in
`qsearch/examples/digits/` so users need neither torch nor scikit-learn, and nothing downloads.
Depthwise convolutions with folded BatchNorm have very uneven per-channel weight ranges, the
textbook case where naive per-tensor INT8 loses accuracy and a per-layer choice wins it back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "digits"
NOISE = 0.35  # std of additive sensor noise; pixels are in [0, 1]


def _noisy(x: np.ndarray, y: np.ndarray, rng, draws: int = 2):
    xs = np.concatenate([x + NOISE * rng.standard_normal(x.shape).astype(np.float32) for _ in range(draws)])
    return xs, np.concatenate([y] * draws)


def _net(expand: int = 4):
    import torch.nn as nn

    def cbr(cin, cout, k=3, s=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

    class InvertedResidual(nn.Module):  # MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project
        def __init__(self, cin, cout, stride):
            super().__init__()
            hidden = cin * expand
            self.body = nn.Sequential(cbr(cin, hidden, 1), cbr(hidden, hidden, 3, stride, groups=hidden),
                                      cbr(hidden, cout, 1, act=False))
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.res else y

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(1, 16)
            self.blocks = nn.Sequential(
                InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1),
            )
            self.head = cbr(32, 128, 1)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            # 8x8 digits upsampled in-graph: the convs work on 16x16 maps like a real edge CNN
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return DigitsNet()


def main(seed: int = 0, epochs: int = 30, lr: float = 1e-2, out: Path = OUT) -> None:
    import onnx
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(x))
    calib, search, test, train = order[:200], order[200:600], order[600:1000], order[1000:]
    # Noisy sensor readings (fixed draws, two per image for search/test): low-margin samples make
    # quantization error visible in top-1, as on real edge data.
    noisy = {
        "calib": (x[calib] + NOISE * rng.standard_normal(x[calib].shape).astype(np.float32), y[calib]),
        "search": _noisy(x[search], y[search], rng),
        "test": _noisy(x[test], y[test], rng),
    }

    net = _net()
    # A high learning rate, as in many quick edge trainings, leaves some ReLU6 channels dead; their
    # BatchNorm variance collapses and folding blows up those depthwise weights: the DFQ paper's
    # MobileNetV2 failure, where per-tensor INT8 loses points and per-channel wins them back.
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = xt[idx] + NOISE * torch.randn_like(xt[idx])
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(noisy["test"][0])).argmax(1).numpy() == noisy["test"][1]).mean()
    print(f"fp32 test top-1 {acc:.4f}")

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "_export.onnx"
    torch.onnx.export(
        net, (torch.from_numpy(x[:2]),), str(tmp), input_names=["image"], output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}}, dynamo=True,
    )
    model = onnx.load(str(tmp))
    onnx.save(model, str(out / "model.onnx"))  # one self-contained file
    for p in out.glob("_export.onnx*"):
        p.unlink()
    for name, (xs, ys) in noisy.items():
        np.savez_compressed(out / f"{name}.npz", image=xs, label=ys)


if __name__ == "__main__":
    main()
