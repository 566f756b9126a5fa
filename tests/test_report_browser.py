"""The ``hesslab analyze`` report in a real browser (headless Chromium): every image loads,
no section is empty, long lists fold. Marked ``browser``: ``make test`` runs it when
Chromium is installed (``.ci/run`` installs it), and it is skipped otherwise.

The page is loaded with a small script added at its end that, on the window's load event,
writes what it found into the DOM (``<pre id="hesslab-check">``); Chromium's
``--dump-dom`` prints the DOM after load, and the test reads that marker back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = "tests.cli_fixtures"

pytestmark = pytest.mark.browser


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var sections = Array.prototype.slice.call(document.querySelectorAll("section"));
  var out = {
    images: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.id; }),
    sections: sections.map(function (s) {
      var h = s.querySelector("h2");
      var body = Array.prototype.slice.call(s.children).filter(function (c) { return c.tagName !== "H2"; });
      return {title: h ? h.textContent : "", items: body.length,
              text: body.map(function (c) { return c.textContent; }).join(" ").trim().length};
    }),
    details: document.querySelectorAll("details").length,
    width: document.documentElement.scrollWidth
  };
  var pre = document.createElement("pre");
  pre.id = "hesslab-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def browser_flags(tmp: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000"]


def check_in_browser(report: Path, tmp: Path, screenshot: Path | None = None) -> dict:
    """Load ``report`` in headless Chromium; what the check script found."""
    exe = chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    page = tmp / "checked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                    encoding="utf-8")
    proc = subprocess.run([exe, *browser_flags(tmp), "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          timeout=180)
    found = re.search(r'<pre id="hesslab-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no check marker in the DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    if screenshot is not None:
        subprocess.run([exe, *browser_flags(tmp), f"--screenshot={screenshot}", "--window-size=1280,3000",
                        report.as_uri()], capture_output=True, text=True, timeout=180)
    import html

    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def analyze_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    cmd = [sys.executable, "-m", "hesslab", "analyze", "--model", f"{FIX}:tiny_mlp", "--data", f"{FIX}:loader",
           "--out", str(out), "--k", "12", "--slq-steps", "30", "--slq-probes", "3", "--trace-matvecs", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_analyze_report_in_chromium(analyze_report, tmp_path):
    shot = analyze_report / "screenshot.png"
    found = check_in_browser(analyze_report / "report.html", tmp_path, screenshot=shot)
    pngs = list((analyze_report / "plots").glob("*.png"))
    assert found["images"] == len(pngs) >= 4
    assert found["broken"] == [], f"images that did not load: {found['broken']}"
    titles = [s["title"] for s in found["sections"]]
    assert {"Summary", "Files"} <= set(titles) and len(titles) >= 4, titles
    for s in found["sections"]:
        assert s["items"] >= 1 and s["text"] > 20, f"empty section {s['title']!r}"
    assert found["details"] >= 1  # the costs (and long file lists) are folded
    assert found["width"] <= 1400  # nothing runs off the page sideways
    if shot.exists():
        assert shot.stat().st_size > 10_000
