"""Rendering only: the Markdown report and figures, the one-page HTML report, and `show`/`diff` of plans."""

from qsearch._exports import lazy

_EXPORTS = {
    "markdown": ("Row", "rows_markdown", "fmt_drop", "speed", "verdict_line", "zoom", "plot_pareto", "write_report", "plot_attribution", "forms_line", "recovery_line", "layer_table", "fusion_table", "attribution_table",),
    "html": ("LayerRow", "layer_rows", "CSS", "JS", "comparison_table", "strip", "render",),
    "review": ("LayerChange", "PlanDiff", "diff", "diff_text", "show_text",),
}
__all__, __getattr__, __dir__ = lazy(__name__, _EXPORTS)
