"""report.html as a reviewer sees it: rendered by a real headless browser (Debian's chromium),
its figures decoded, its tables filled with the plan's own figures."""

import json
import re
import shutil
import subprocess

import pytest

from qsearch.cli import main
from qsearch.plan import Plan

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

WRAPPER = """<!doctype html><html><body><iframe id="r" src="{src}" width="1200" height="900"></iframe>
<pre id="out">pending</pre><script>
document.getElementById("r").addEventListener("load", () => {{
  const d = document.getElementById("r").contentDocument;
  document.getElementById("out").textContent = JSON.stringify({{title: d.title,
    images: [...d.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]),
    tables: [...d.querySelectorAll("table")].map(t => t.rows.length),
    headings: [...d.querySelectorAll("h2")].map(h => h.textContent), text: d.body.innerText}});
}});
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_headless_browser(workload, tmp_path):
    out = tmp_path / "run"
    assert main(["optimize", "--config", str(workload), "--budget", "3", "--out", str(out)]) == 0
    plan = Plan.read(out / "plan.yaml")
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(WRAPPER.format(src=(out / "report.html").as_uri()))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          wrapper.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "pending", dom[-2000:]
    page = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert page["title"] == "qsearch report: tiny"
    assert [alt for alt, _ in page["images"]] == ["Pareto front", "Where the time goes", "Layer sensitivity"]
    assert all(decoded for _, decoded in page["images"])  # the embedded PNGs decode
    plans, layers, attribution, fusion = page["tables"]
    assert plans == 5 and layers == 1 + len(plan.layers) and attribution == 4 and fusion >= 3
    assert page["headings"][0].startswith("Layers (graph order)")
    m = plan.metrics["plan"]
    assert f"{m['test']:.4f}" in page["text"] and f"{m['latency_ms']:.3f}" in page["text"]
    assert all(name in page["text"] for name in plan.layers)
