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


def _net():
    import torch.nn as nn

    def cbr(cin, cout, k=3, s=1, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class Basic(nn.Module):  # ResNet basic block: dense 3x3 convs, where int8 kernels pay most
        def __init__(self, c):
            super().__init__()
            self.a, self.b, self.act = cbr(c, c), cbr(c, c, relu=False), nn.ReLU()

        def forward(self, x):
            return self.act(x + self.b(self.a(x)))

    class Separable(nn.Module):  # MobileNet block: depthwise + pointwise, where per-tensor hurts
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.dw = cbr(cin, cin, 3, stride, groups=cin)
            self.pw = cbr(cin, cout, 1, relu=False)
            self.res = stride == 1 and cin == cout
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.pw(self.dw(x))
            return self.act(x + y if self.res else y)

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(1, 32)
            self.blocks = nn.Sequential(Basic(32), Separable(32, 64, 2), Basic(64), Separable(64, 64, 1))
            self.head = cbr(64, 256, 1)
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            # 8x8 digits upsampled in-graph: the convs work on 16x16 maps like a real edge CNN
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return DigitsNet()


def main(seed: int = 0, epochs: int = 40) -> None:
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
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
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

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "_export.onnx"
    torch.onnx.export(
        net, (torch.from_numpy(x[:2]),), str(tmp), input_names=["image"], output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}}, dynamo=True,
    )
    model = onnx.load(str(tmp))
    onnx.save(model, str(OUT / "model.onnx"))  # one self-contained file
    for p in OUT.glob("_export.onnx*"):
        p.unlink()
    for name, (xs, ys) in noisy.items():
        np.savez_compressed(OUT / f"{name}.npz", image=xs, label=ys)


if __name__ == "__main__":
    main()
