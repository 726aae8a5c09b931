"""Open an HTML report in headless Chromium and check what the browser loaded.

    python scripts/check_report_in_browser.py runs/demo/report.html [--screenshot out.png]

Dumps the DOM after load (chromium --headless --dump-dom). Checks that it holds the
training-curve SVGs and at least one image per shown latent, every image an embedded
data URI (the report must work offline). Exits 0 when it does; 2 when no Chromium is
installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def check(report: Path, screenshot: Path | None = None) -> list[str]:
    """Problems found (empty when the report loaded as expected)."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (looked for " + ", ".join(BROWSERS) + ")")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    url = report.resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    problems = []
    sections = len(re.findall(r'<section class="latent">', dom))
    images = re.findall(r'<img src="([^"]*)"', dom)
    if "</html>" not in dom:
        problems.append("the browser returned no document")
    if len(re.findall(r"<svg", dom)) < 2:
        problems.append("the training-curve plots are missing")
    if sections == 0 or len(images) < sections:
        problems.append(f"{sections} latent sections but {len(images)} images")
    if any(not src.startswith("data:image/png;base64,") for src in images):
        problems.append("an image is not embedded (the report would need files or a network)")
    if screenshot is not None:
        subprocess.run([browser, *flags, f"--screenshot={screenshot}", "--window-size=1200,2400", url],
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
        print(f"check_report_in_browser: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    print("report loads in Chromium" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
