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

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_report_in_browser import BROWSERS, find_browser  # noqa: E402

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
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (looked for " + ", ".join(BROWSERS) + ")")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    url = report.resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    problems = dom_problems(dom)
    if screenshot is not None:
        subprocess.run([browser, *flags, f"--screenshot={screenshot}", "--window-size=1400,3000", url],
                       capture_output=True, timeout=120)
        if not screenshot.exists() or screenshot.stat().st_size == 0:
            problems.append("the browser wrote no screenshot")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        problems = check(args.report, args.screenshot)
    except FileNotFoundError as exc:
        print(f"check_eval_report_in_browser: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    print("eval report loads in Chromium" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
