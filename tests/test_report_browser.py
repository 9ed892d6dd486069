"""report.html as a reviewer sees it: rendered by a real headless browser (Debian's chromium) at
1400 px: the first screen, the layer table's sorting and filters, the figures, the numbers'
formatting, and the printed PDF."""

import json
import re
import shutil
import subprocess

import pytest

from qsearch.cli import main
from qsearch.plan.io import read_plan

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

WRAPPER = """<!doctype html><html><body style="margin:0"><iframe id="r" src="{src}" width="1400" height="1000"
style="border:0"></iframe><pre id="out">pending</pre><script>
document.getElementById("r").addEventListener("load", () => {{
  const w = document.getElementById("r").contentWindow, d = w.document;
  const bottom = sel => {{ const e = d.querySelector(sel); return e ? e.getBoundingClientRect().bottom : 1e9; }};
  const col = i => [...d.querySelectorAll("#layers tbody tr")].map(r => r.cells[i].dataset.v);
  const visible = () => [...d.querySelectorAll("#layers tbody tr")].filter(r => r.style.display !== "none").length;
  const th = d.querySelectorAll("#layers th")[6];
  th.click(); const up = col(6); th.click(); const down = col(6);
  d.querySelector(".controls button[data-k=int8]").click(); const int8 = visible();
  d.querySelector(".controls button[data-k=float]").click(); const float = visible();
  d.querySelector(".controls button[data-k=all]").click(); const all = visible();
  document.getElementById("out").textContent = JSON.stringify({{title: d.title,
    first: [bottom("#verdict"), bottom("#plans"), bottom("img[alt='Pareto front']")],
    images: [...d.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]),
    up, down, int8, float, all,
    drops: [...d.querySelectorAll("#plans tr")].slice(1).map(r => [r.cells[1].textContent, r.cells[2].textContent]),
    text: d.body.innerText}});
}});
</script></body></html>"""


def _significant(number: str) -> int:
    return len(number.replace("-", "").replace(".", "").lstrip("0"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_sorts_filters_and_prints(workload, tmp_path):
    out = tmp_path / "run"
    assert main(["optimize", "--config", str(workload), "--budget", "3", "--out", str(out)]) == 0
    plan = read_plan(out / "plan.yaml")
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(WRAPPER.format(src=(out / "report.html").as_uri()))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100"]
    dom = subprocess.run([*browser, "--virtual-time-budget=10000", "--dump-dom", wrapper.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "pending", dom[-2000:]
    page = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert page["title"] == "qsearch report: tiny"
    assert max(page["first"]) <= 1000, page["first"]  # verdict, comparison table, Pareto plot: the first screen
    assert [alt for alt, _ in page["images"]][:2] == ["Pareto front", "Where the time goes"]
    assert all(decoded for _, decoded in page["images"])  # the embedded PNGs decode
    # sorting by SQNR: ascending, then descending (empty cells last both times)
    up = [float(v) for v in page["up"] if v]
    down = [float(v) for v in page["down"] if v]
    assert up == sorted(up) and down == sorted(down, reverse=True) and len(up) > 1
    n_int8 = sum(plan.choice(n).quantized for n in plan.layers)
    assert (page["int8"], page["float"], page["all"]) == (n_int8, len(plan.layers) - n_int8, len(plan.layers))
    for cells in page["drops"]:  # drops with at most 4 significant digits
        for cell in cells:
            assert all(_significant(x) <= 4 for x in re.findall(r"-?\d+\.\d+|-?\d+", cell)), cell
    decimals = re.findall(r"-?\d+\.\d+", page["text"])
    assert decimals and all(_significant(x) <= 6 for x in decimals), [x for x in decimals if _significant(x) > 6]
    assert all(name in page["text"] for name in plan.layers)
    # printed: every figure is in the PDF, the ones in collapsed sections too
    pdf = tmp_path / "report.pdf"
    subprocess.run([*browser, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    images = len(re.findall(rb"/Subtype\s*/Image", pdf.read_bytes()))
    assert images >= len(page["images"]), (images, page["images"])
