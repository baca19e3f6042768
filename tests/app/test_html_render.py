"""``report.html`` opened in headless Chromium: the figures decode and render, the tables show."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium; .ci/run does it)"
)

# Appended to a copy of the page: after load, write each image's decoded size and each element's box.
PROBE = """<script>window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  const out = {images: [...document.images].map(i => ({w: i.naturalWidth, box: box(i)})),
               tables: [...document.querySelectorAll('table')].map(box),
               height: document.documentElement.scrollHeight};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", *args], capture_output=True, text=True, timeout=timeout)


def test_report_html_renders_figures_and_tables(quick_report, tmp_path):
    page = tmp_path / "probe.html"
    page.write_text((quick_report.out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    width = 1200
    dom = _chromium(f"--window-size={width},2000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the page did not load in Chromium"
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(layout["images"]) == 4 and all(img["w"] > 300 for img in layout["images"])  # every PNG decoded
    assert len(layout["tables"]) >= 6

    shot = tmp_path / "shot.png"
    proc = _chromium(f"--window-size={width},{int(layout['height']) + 50}", f"--screenshot={shot}",
                     (quick_report.out / "report.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    for kind, boxes in (("figure", [img["box"] for img in layout["images"]]), ("table", layout["tables"])):
        for left, top, w, h in boxes:
            region = pixels[int(top):int(top + h), int(left):int(left + w)]
            assert region.size and w > 50 and h > 20, f"{kind} at {top:.0f} has no size"
            assert region.std() > 0.05, f"{kind} at y={top:.0f} renders blank"
