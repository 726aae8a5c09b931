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


def load(report: Path, screenshot: Path | None = None, window: str = "1200,2400") -> tuple[str, list[str]]:
    """(the DOM headless Chromium built from ``report``, problems of the screenshot if one
    was asked for). FileNotFoundError when no Chromium is installed."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (looked for " + ", ".join(BROWSERS) + ")")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    url = report.resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    problems = []
    if screenshot is not None:
        subprocess.run([browser, *flags, f"--screenshot={screenshot}", f"--window-size={window}", url],
                       capture_output=True, timeout=120)
        if not screenshot.exists() or screenshot.stat().st_size == 0:
            problems.append("the browser wrote no screenshot")
    return dom, problems


def check(report: Path, screenshot: Path | None = None) -> list[str]:
    """Problems found (empty when the report loaded as expected)."""
    dom, problems = load(report, screenshot)
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
    return problems


def run_checker(check_report, name: str, loaded: str, description: str, argv=None) -> int:
    """The command line of a report checker: exit 0 when check_report finds nothing, 1 with
    the problems, 2 when no Chromium is installed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        problems = check_report(args.report, args.screenshot)
    except FileNotFoundError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    print(loaded if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    return run_checker(check, "check_report_in_browser", "report loads in Chromium", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
