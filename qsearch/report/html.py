"""report.html: one self-contained page (figures embedded, no network) a reviewer reads in thirty
seconds. First screen: the verdict in one sentence, the comparison table, the Pareto plot zoomed
on the budget and where the time goes. Below: a strip of the model coloured by precision, the
layer table (sortable, filterable, sensitivity and saving drawn in the cells), then the analysis
details in collapsible sections, opened for printing."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qsearch.report.markdown import Row, fmt_drop, rows_markdown


@dataclass(frozen=True)
class LayerRow:
    """One layer as the table shows it; numbers None where the analysis did not measure them."""

    index: int
    layer: str
    name: str
    op: str
    precision: str  # int8 | fp32 | fp16 in the chosen plan
    chosen: str  # the chosen option's label
    naive: str
    mmacs: float | None = None
    rank: int | None = None  # sensitivity rank, 1 the most sensitive
    sqnr: float | None = None  # output SQNR (dB) of the layer alone INT8 at its best option
    saves_ms: float | None = None  # what INT8 saves, measured, glue included
    why: str = ""


def layer_rows(chosen, naive, profile) -> list[LayerRow]:
    ranked = {x.name: (i, x) for i, x in enumerate(profile.layers, 1)}
    rows = []
    for k, name in enumerate(chosen.layers, 1):
        note = chosen.notes.get(name)
        rank, x = ranked.get(name, (None, None))
        c = chosen.choice(name)
        rows.append(LayerRow(k, name, note.readable if note else "", note.op if note else "", c.precision, c.label(),
                             naive.choice(name).label(), None if x is None else x.macs / 1e6, rank,
                             None if x is None else x.output_sqnr, None if x is None else x.gain_ms,
                             note.why if note else ""))
    return rows


CSS = """
body{font-family:system-ui,sans-serif;max-width:1320px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.3em;margin:.2em 0}.verdict{font-size:1.25em;margin:.4em 0 .8em;font-weight:600}
.badge{display:inline-block;background:#fde0c5;color:#7a3b00;border-radius:4px;padding:1px 6px;font-size:.8em;
margin-left:6px}.top{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1em;align-items:start}
.top img{width:100%}.top>div{min-width:0;overflow-x:auto}#plans td:first-child{white-space:normal}.wide{overflow-x:auto}
#layers td:last-child{white-space:normal;min-width:260px;text-align:left}table{border-collapse:collapse;font-size:.85em;margin-bottom:.6em}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}tr.chosen td{background:#eef5ff;font-weight:600}
.strip{display:flex;height:26px;border:1px solid #999;margin:.3em 0}.strip span{flex:1;min-width:1px}
.int8{background:#2166ac}.fp32{background:#cfcfcf}.fp16{background:#e6ab02}.strip .edge{border-left:2px solid #000}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
.controls button{margin-right:4px}.controls button.on{background:#2166ac;color:#fff}
#layers th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}#layers td.l{text-align:left}
.bar{display:inline-block;height:9px;background:#d6604d;margin-right:4px;vertical-align:middle}
.bar.save{background:#1b7837}.bar.cost{background:#b2182b}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
@media print{.controls{display:none}details::details-content{content-visibility:visible;display:block}
body{max-width:none}.top{display:block}#layers th{position:static}tr{break-inside:avoid}}
"""

JS = """
const t=document.getElementById('layers');let dir={};
t.querySelectorAll('th').forEach((th,i)=>th.addEventListener('click',()=>{
 const rows=[...t.tBodies[0].rows];dir[i]=-(dir[i]||-1);
 rows.sort((a,b)=>{const x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
  const nx=parseFloat(x),ny=parseFloat(y);
  if(x===''&&y!=='')return 1;if(y===''&&x!=='')return -1;
  return (isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny)*dir[i];});
 rows.forEach(r=>t.tBodies[0].appendChild(r));}));
function show(kind){document.querySelectorAll('.controls button').forEach(b=>b.classList.toggle('on',b.dataset.k===kind));
 const q=document.getElementById('q').value.toLowerCase();
 [...t.tBodies[0].rows].forEach(r=>{const ok=(kind==='all'||r.dataset[kind]==='1')&&r.textContent.toLowerCase().includes(q);
  r.style.display=ok?'':'none';});window.kind=kind;}
document.querySelectorAll('.controls button').forEach(b=>b.addEventListener('click',()=>show(b.dataset.k)));
document.getElementById('q').addEventListener('input',()=>show(window.kind||'all'));
window.addEventListener('beforeprint',()=>document.querySelectorAll('details').forEach(d=>d.open=true));
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def _num(v: float | None, fmt: str) -> tuple[str, str]:
    """(data-v for sorting, text)."""
    return ("", "") if v is None else (repr(float(v)), format(v, fmt))


def comparison_table(rows: Sequence[Row], metric: str, fp32_latency: float, fp32_size: int) -> str:
    bops = any(r.bitops is not None for r in rows)  # an analytic objective: GBOPs decided
    out = ["<table id='plans'><tr><th>plan</th><th>search drop</th><th>test drop</th><th>latency ms</th>"
           "<th>speed-up</th><th>size</th>" + ("<th>GBOPs</th>" if bops else "")
           + "<th>quantized layers</th><th>evaluations</th></tr>"]
    fp = rows[0]
    for k, r in enumerate(rows):
        test = "over budget: not scored" if r.test_score != r.test_score else fmt_drop(fp.test_score - r.test_score)
        badge = ("<span class='badge' title='the two best timing rounds differ by more than 10%: the machine was "
                 "busy; plans were re-timed and, when wall time ran well above CPU time, compared on thread CPU "
                 "time'>noisy timing</span>" if r.latency_spread > 0.1 else "")
        out.append(f"<tr class='{'chosen' if k == len(rows) - 1 else ''}'><td>{html.escape(r.name)}</td>"
                   f"<td>{fmt_drop(fp.search_score - r.search_score)}</td><td>{test}</td>"
                   f"<td>{r.latency_ms:.3g} ±{r.latency_spread:.0%}{badge}</td><td>{fp32_latency / r.latency_ms:.2f}x</td>"
                   f"<td>{r.size_bytes / fp32_size:.2f}x</td>" + (f"<td>{r.bitops:.4g}</td>" if bops else "")
                   + f"<td>{r.int8_layers}</td>"
                   f"<td>{'' if r.evaluations is None else r.evaluations}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def strip(layers: Sequence[LayerRow]) -> str:
    cells, prev = [], None
    for x in layers:
        edge = " edge" if prev is not None and (prev == "int8") != (x.precision == "int8") else ""
        cells.append(f"<span class='{x.precision}{edge}' title='{x.index}: {html.escape(x.layer)} ({x.op}) "
                     f"{html.escape(x.chosen)}'></span>")
        prev = x.precision
    borders = sum(" edge" in c for c in cells)
    return (f"<div class='strip' id='strip'>{''.join(cells)}</div><div class='legend'>graph order, left to right: "
            f"<span class='int8'></span>INT8<span class='fp32'></span>FP32<span class='fp16'></span>FP16; "
            f"{borders} precision changes along the graph order (black lines; where INT8 layers meet float ones "
            "through a tensor, Q/DQ glue runs)</div>")


def layer_table(layers: Sequence[LayerRow]) -> str:
    top_sqnr = max((x.sqnr for x in layers if x.sqnr is not None), default=1.0) or 1.0
    top_save = max((abs(x.saves_ms) for x in layers if x.saves_ms is not None), default=1.0) or 1.0
    head = ["#", "layer", "name", "op", "MMACs", "sensitivity rank", "SQNR dB", "INT8 saves ms", "naive", "chosen", "why"]
    out = ["<div class='controls'>show: <button data-k='all' class='on'>all</button><button data-k='changed'>changed "
           "from naive</button><button data-k='int8'>INT8 only</button><button data-k='float'>float only</button> "
           "<input id='q' placeholder='filter text'></div>",
           "<div class='wide'><table id='layers'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for x in layers:
        sq_v, sq_t = _num(x.sqnr, ".1f")
        sv_v, sv_t = _num(x.saves_ms, "+.3g")
        mm_v, mm_t = _num(x.mmacs, ".3g")
        # low SQNR = sensitive: the bar grows as the SQNR falls
        sens_bar = "" if x.sqnr is None else f"<span class='bar' style='width:{40 * (1 - min(x.sqnr / top_sqnr, 1)):.0f}px'></span>"
        save_bar = "" if x.saves_ms is None else (f"<span class='bar {'save' if x.saves_ms > 0 else 'cost'}' "
                                                  f"style='width:{40 * abs(x.saves_ms) / top_save:.0f}px'></span>")
        flags = (f"data-changed='{int(x.chosen != x.naive)}' data-int8='{int(x.precision == 'int8')}' "
                 f"data-float='{int(x.precision != 'int8')}'")
        cells = [(str(x.index), str(x.index)), (x.layer, html.escape(x.layer)), (x.name, html.escape(x.name)),
                 (x.op, x.op), (mm_v, mm_t), ("" if x.rank is None else str(x.rank), "" if x.rank is None else str(x.rank)),
                 (sq_v, sens_bar + sq_t), (sv_v, save_bar + sv_t), (x.naive, x.naive), (x.chosen, x.chosen),
                 (x.why, html.escape(x.why))]
        tds = "".join(f"<td data-v='{html.escape(v)}'{' class=l' if j in (1, 2, 3, 8, 9, 10) else ''}>{t}</td>"
                      for j, (v, t) in enumerate(cells))
        out.append(f"<tr {flags}>{tds}</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _md_table_html(table: str) -> str:
    head, _, *body = table.splitlines()
    cells = [c.strip() for c in head.strip("|").split("|")]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>"]
    for line in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render(*, title: str, verdict: str, summary: Sequence[str], rows: Sequence[Row], metric: str,
           fp32_latency: float, fp32_size: int, pareto: Path, attribution: Path, layers: Sequence[LayerRow],
           details: Sequence[tuple[str, str]] = (), figures: Sequence[tuple[str, Path]] = ()) -> str:
    """The page.

    Args:
        title, verdict: the heading and the one-sentence verdict under it.
        summary: the verdict's supporting lines (markdown).
        rows: the plans compared (FP32, naive, the greedy fallback, the finalists), in table order.
        metric: the metric's name; fp32_latency, fp32_size: the reference for ratios.
        pareto, attribution: the two figures of the first screen (PNG files, inlined).
        layers: one row per layer for the strip and the layer table.
        details: (heading, markdown table) sections, collapsed; figures: (caption, png) below them.
    """
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='verdict' id='verdict'>{html.escape(verdict)}</p>",
             comparison_table(rows, metric, fp32_latency, fp32_size),
             f"<div class='top'><div><h3>Pareto front, zoomed on the budget</h3>{_img(pareto, 'Pareto front')}</div>",
             f"<div><h3>Where the time goes</h3>{_img(attribution, 'Where the time goes')}</div></div>",
             "<h2>The model, layer by layer</h2>", strip(layers), layer_table(layers),
             "<details open><summary>How this plan was found</summary>"
             + "".join(f"<p>{html.escape(s)}</p>" for s in summary if s) + "</details>"]
    for heading, table in details:
        parts.append(f"<details><summary>{html.escape(heading)}</summary>{_md_table_html(table)}</details>")
    for caption, png in figures:
        img = _img(png, caption)
        if img:
            parts.append(f"<details><summary>{html.escape(caption)}</summary>{img}</details>")
    parts.append(f"<details><summary>The comparison as text</summary><pre>"
                 f"{html.escape(rows_markdown(list(rows), metric, fp32_latency, fp32_size))}</pre></details>")
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)
