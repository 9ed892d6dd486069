"""The fine-tuning report: PTQ against QAT at the same plan (search and test scores, drops against
FP32, latency), why training stopped, and the loss and search-metric curves per epoch."""

from __future__ import annotations

from pathlib import Path

from qsearch.files import atomic_write_text, save_figure


def write_report(r, out: Path) -> None:
    """`r`: a `finetune.run.FinetuneResult`. Writes report.md and finetune.png in `out`."""
    _curves(r, out / "finetune.png")
    atomic_write_text(out / "report.md", report_text(r))


def report_text(r) -> str:
    h = r.history
    settings = r.plan.provenance.get("finetune", {})
    src = r.plan.provenance.get("finetuned_from", {})
    lines = [
        f"# Fine-tuning (QAT) of `{r.plan.model_name}` at the same plan",
        "",
        f"Source plan: sha256 {src.get('plan_sha256', '?')} of model {src.get('model', '?')} "
        f"({src.get('model_fingerprint', '?')}); "
        f"settings: {', '.join(f'{k} {v}' for k, v in settings.items() if k != 'epoch')}.",
        f"Training stopped: {h.stopped}; the best search score came at epoch {h.best.epoch}"
        + (" (epoch 0 is the plan as it was: fine-tuning did not improve it)" if h.best.epoch == 0 else "") + ".",
        f"{r.evaluations} model evaluations, {r.seconds / 60:.1f} minutes.",
        "",
        "| model | search | drop (search) | test | drop (test) | latency ms |",
        "|---|---:|---:|---:|---:|---:|",
        f"| FP32 | {r.fp32_search:.4f} | | {r.fp32_test:.4f} | | |",
        f"| PTQ (the plan as given) | {r.ptq_search:.4f} | {r.fp32_search - r.ptq_search:.4f} | {r.ptq_test:.4f} | "
        f"{r.fp32_test - r.ptq_test:.4f} | {r.ptq_latency_ms:.3f} |",
        f"| QAT (fine-tuned, same layers INT8) | {r.qat_search:.4f} | {r.fp32_search - r.qat_search:.4f} | "
        f"{r.qat_test:.4f} | {r.fp32_test - r.qat_test:.4f} | {r.qat_latency_ms:.3f} |",
        "",
        "Latencies are one timing each (not interleaved): the two models have the same INT8 layers and Q/DQ "
        "layout, so any difference is timing noise.",
        "",
        "| epoch | loss | search | seconds |",
        "|---:|---:|---:|---:|",
        *(f"| {e.epoch} | {e.loss:.4g} | {e.search:.4f} | {e.seconds:.1f} |" for e in h.epochs),
        "",
        "![loss and search metric per epoch](finetune.png)",
        "",
    ]
    return "\n".join(lines)


def _curves(r, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e.epoch for e in r.history.epochs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [e.loss for e in r.history.epochs], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("distillation loss")
    a.set_yscale("log")
    b.plot(epochs, [e.search for e in r.history.epochs], marker="o", label="QAT (exported QDQ)")
    b.axhline(r.fp32_search, color="gray", linestyle="--", label="FP32")
    b.axhline(r.ptq_search, color="tab:red", linestyle=":", label="PTQ plan")
    b.set_xlabel("epoch")
    b.set_ylabel("search metric")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
