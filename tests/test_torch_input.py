"""A workload that names a PyTorch module factory instead of an ONNX file: exported once with the
dynamo exporter (opset 18, dynamic batch), cached, searched end to end; without PyTorch, one line."""

import sys

import numpy as np
import pytest

from qsearch.cli import main
from qsearch.config import load_workload
from qsearch.errors import QsearchError
from qsearch.plan.io import read_plan

from .conftest import last_error

NET = '''
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()


def build_bf16():
    return build().to(torch.bfloat16)


def build_fp16():
    return build().half()


def build_meta():
    with torch.device("meta"):
        return Net()


class Stateful(Net):
    def get_extra_state(self):
        return {"vocab": ["a", "b"], "version": 3}

    def set_extra_state(self, state):
        pass


def build_extra():
    torch.manual_seed(0)
    return Stateful()


class Branchy(Net):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return super().forward(x)
        return super().forward(-x)


def build_branchy():
    return Branchy()
'''


def _workload(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (CI installs it)")
    d = tmp_path / "w"
    d.mkdir()
    (d / "tinynet.py").write_text(NET)
    sys.path.insert(0, str(d))
    try:
        from tinynet import build  # noqa: PLC0415
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("tinynet", None)
    net = build().eval()
    rng = np.random.default_rng(0)
    for split in ("calib", "search", "test"):
        x = rng.normal(0, 1, (96, 3, 8, 8)).astype(np.float32)
        with torch.no_grad():
            y = net(torch.from_numpy(x)).argmax(1).numpy()
        np.savez(d / f"{split}.npz", x=x, label=y)
    cfg = d / "workload.yaml"
    cfg.write_text("name: tinynet\nmodel: {torch: 'tinynet:build', example_input: [1, 3, 8, 8]}\n"
                   "data:\n  batch_size: 32\n  calibration: {npz: calib.npz, labels: label}\n"
                   "  search: {npz: search.npz, labels: label}\n  test: {npz: test.npz, labels: label}\n"
                   "metric: top1\nmax_drop: 0.02\n")
    return cfg


def test_torch_module_is_exported_cached_and_searched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = _workload(tmp_path)
    first = load_workload(cfg).model
    assert first.parent == tmp_path / "cache" / "torch" and first.suffix == ".onnx"
    stamp = first.stat().st_mtime_ns
    assert load_workload(cfg).model == first and first.stat().st_mtime_ns == stamp  # cached, not re-exported
    out = tmp_path / "out"
    assert main(["optimize", "--config", str(cfg), "--budget", "3", "--out", str(out)]) == 0
    plan = read_plan(out / "plan.yaml")
    names = {n.readable for n in plan.notes.values()}
    assert {"stem", "blocks.0.conv", "blocks.1.conv", "fc"} <= names  # the module paths, from the exporter
    from .test_reliability import check_result

    check_result(out, cfg, model=first)  # re-applied byte for byte, scores reproduced, budget met


def test_torch_input_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = _workload(tmp_path)
    text = cfg.read_text()
    cfg.write_text(text.replace("example_input: [1, 3, 8, 8]", "example_input: [1, 3, eight]"))
    with pytest.raises(QsearchError, match="model.example_input must be a shape"):
        load_workload(cfg)
    cfg.write_text(text.replace("tinynet:build", "tinynet:nothing"))
    assert main(["analyze", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "has no function 'nothing'" in last_error(capsys)
    cfg.write_text(text.replace("example_input: [1, 3, 8, 8]", "example_input: [1, 65536, 65536, 65536]"))
    assert main(["analyze", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "is too large to allocate" in last_error(capsys)
    cfg.write_text(text)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(QsearchError, match=r"model.torch needs PyTorch, which is not installed"):
        load_workload(cfg)


def test_a_cache_folder_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """QSEARCH_CACHE, or its torch/ folder, being a file: one line naming it, no traceback."""
    for case, blocked in (("a", "cache"), ("b", "cache/torch")):
        base = tmp_path / case
        (base / blocked).parent.mkdir(parents=True, exist_ok=True)
        (base / blocked).write_text("not a folder")
        monkeypatch.setenv("QSEARCH_CACHE", str(base / "cache"))
        cfg = _workload(base)
        capsys.readouterr()
        assert main(["analyze", "--config", str(cfg), "--out", str(base / "o")]) == 2
        err = capsys.readouterr().err
        assert "QSEARCH_CACHE" in err and "Traceback" not in err, err[-500:]


def test_unusual_torch_modules_export_or_fail_in_one_line(tmp_path, monkeypatch, capsys):
    """bf16 and fp16 weights are widened to float32 and said, get_extra_state is hashed by its repr, weights on the
    meta device are refused, and an export failure is one line pointing at the exporter's log."""
    import onnx

    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = _workload(tmp_path)
    text = cfg.read_text()
    for factory, said in (("build_bf16", "bfloat16"), ("build_fp16", "float16"), ("build_extra", None)):
        cfg.write_text(text.replace("tinynet:build", f"tinynet:{factory}"))
        w = load_workload(cfg)
        dtypes = {i.data_type for i in onnx.load(str(w.model)).graph.initializer if i.data_type in (1, 10, 16)}
        assert dtypes == {onnx.TensorProto.FLOAT}, (factory, dtypes)
        assert w.model.with_suffix(".export.log").is_file()
        # a widened module is said, in one line naming its dtype, when a command opens it
        assert [said in n and "widened to float32" in n for n in w.notes] == ([True] if said else [])
    cfg.write_text(text.replace("tinynet:build", "tinynet:build_bf16"))
    capsys.readouterr()
    assert main(["analyze", "--config", str(cfg), "--out", str(tmp_path / "o16")]) == 0
    assert "bfloat16 weights: widened to float32" in capsys.readouterr().err
    for factory, message in (("build_meta", "weights on the meta device"), ("build_branchy", "exporter's log")):
        cfg.write_text(text.replace("tinynet:build", f"tinynet:{factory}"))
        capsys.readouterr()
        assert main(["analyze", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and "\x1b" not in err, err[-600:]
        assert len(err.splitlines()) == 1, err[-600:]


def test_a_torch_factory_workload_fine_tunes_its_plan(tmp_path, monkeypatch):
    """`finetune` on a PyTorch-factory workload: the exported graph is what it mirrors and writes back."""
    pytest.importorskip("qsearch.qat.mirror", reason="the train extra is not installed (CI installs it)")
    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = _workload(tmp_path)
    plan = tmp_path / "naive.yaml"
    assert main(["baseline", "naive", "--config", str(cfg), "-o", str(plan), "--cache", str(tmp_path / "c")]) == 0
    out = tmp_path / "qat"
    assert main(["finetune", "--config", str(cfg), "--plan", str(plan), "--out", str(out), "--epochs", "2"]) == 0
    assert main(["apply", str(out / "plan.yaml"), str(out / "model.finetuned.onnx"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == (out / "model.qsearch.onnx").read_bytes()
    assert read_plan(out / "plan.yaml").provenance["finetuned_from"]["model_fingerprint"] == read_plan(plan).fingerprint
