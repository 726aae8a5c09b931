"""Open a ``saeengine eval`` report in headless Chromium and check what the browser loaded.

    python scripts/check_eval_report_in_browser.py runs/enc/eval/report.html [--screenshot out.png]

Dumps the DOM after load (chromium --headless --dump-dom) and checks that it holds every
section (metrics, latents, exemplars, downstream, experiments), the metric table, the
frequency scatter and histogram, an activation histogram and at least one exemplar image
per latent card, that every image is an embedded PNG data URI that the browser decoded,
and that nothing points outside the file (no external src or href). Exits 0 when it
does, 1 with the problems, 2 when no Chromium is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_report_in_browser import load, run_checker  # noqa: E402

SECTIONS = ("metrics", "latents", "exemplars", "downstream", "experiments")
DATA_PNG = "data:image/png;base64,"


def dom_problems(dom: str) -> list[str]:
    """Problems of a report's DOM as the browser dumped it (empty when it is complete)."""
    problems = []
    if "</html>" not in dom:
        return ["the browser returned no document"]
    problems += [f"section {name!r} is missing" for name in SECTIONS if f'<section id="{name}"' not in dom]
    if not re.search(r'<table class="metrics">.*?<td class="definition">', dom, re.S):
        problems.append("the metric table (with definitions) is missing")
    for plot in ("scatter", "frequency-histogram"):
        if not re.search(rf'<img class="plot" id="{plot}" src="{re.escape(DATA_PNG)}', dom):
            problems.append(f"the {plot} plot is missing")
    cards = re.findall(r'<section class="latent".*?</section>', dom, re.S)
    if not cards:
        problems.append("no latent cards")
    for card in cards:
        latent = re.search(r'id="latent-(\d+)"', card)
        name = f"latent {latent.group(1) if latent else '?'}"
        if 'class="plot histogram"' not in card:
            problems.append(f"{name}: no activation histogram")
        if 'class="rule"' in card and '<img class="exemplar"' not in card:
            problems.append(f"{name}: a rule row without exemplar images")
    if not any('<img class="exemplar"' in card for card in cards):
        problems.append("no exemplar images at all")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', dom)
    if any(not src.startswith(DATA_PNG) for src in sources):
        problems.append("an image is not an embedded PNG data URI (the report would need files or a network)")
    external = [u for u in re.findall(r'\s(?:src|href)="([^"]*)"', dom) if not u.startswith(("data:", "#"))]
    if external:
        problems.append(f"the page points outside itself: {external[:3]}")
    decoded = re.search(r'data-images-decoded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    if not decoded or not total:
        problems.append("the page's load check did not run")
    elif decoded.group(1) != total.group(1) or int(total.group(1)) != len(sources):
        problems.append(f"the browser decoded {decoded.group(1)} of {total.group(1)} images")
    return problems


def check(report: Path, screenshot: Path | None = None) -> list[str]:
    """Problems found in ``report`` as headless Chromium loads it (empty when none)."""
    dom, problems = load(report, screenshot, window="1400,3000")
    return dom_problems(dom) + problems


def main(argv=None) -> int:
    return run_checker(check, "check_eval_report_in_browser", "eval report loads in Chromium", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
