"""The record -> train -> encode -> eval pipeline from the shell on real offline images,
as a user runs it.

Records EfficientNet-Lite0 (the packaged ImageNet weights) at blocks.5 over the
scikit-image sample images (a real folder with non-image files and an unreadable
multi-page TIFF among them), trains a TopK SAE with ``saeengine train``, encodes the
store with ``saeengine encode`` and evaluates it with ``saeengine eval --backbone
efficientnet-lite0`` (metrics, the spliced model's KL, the HTML report). Keeps what every
command printed, the final metrics and the timings in a JSON result file.

    python benchmarks/cli_real_data.py --out benchmarks/results/2026-12-01-cli-skimage.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import skimage

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr).strip(), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON result file to write")
    args = parser.parse_args()
    images = Path(skimage.__file__).parent / "data"
    cli = [sys.executable, "-m", "saeengine.cli"]
    work = Path(tempfile.mkdtemp(prefix="saeengine-cli-"))
    try:
        record = [*cli, "record", str(images), "--layers", "blocks.5", "--image-size", "128",
                  "--out-dir", str(work / "acts"), "--skip-unreadable", "--no-progress"]
        train = [*cli, "train", "--data", str(work / "acts" / "blocks.5"), "--d-sae", "512", "--k", "8",
                 "--batch-size", "256", "--total-tokens", "100000", "--out-dir", str(work / "runs"),
                 "--no-progress"]
        encode = [*cli, "encode", "--sae", "SAE_DIR", "--data", str(work / "acts" / "blocks.5"),
                  "--out", str(work / "encoded"), "--no-progress"]
        evaluate = [*cli, "eval", "--encoded", str(work / "encoded"), "--backbone", "efficientnet-lite0",
                    "--images", str(images), "--no-progress"]
        steps = []
        for name, argv in (("record", record), ("train", train), ("encode", encode), ("eval", evaluate)):
            saved = sorted((work / "runs").glob("*/sae.safetensors"))
            argv = [saved[0].parent.as_posix() if a == "SAE_DIR" and saved else a for a in argv]
            code, output, seconds = _run(argv)
            steps.append({"command": " ".join(["saeengine", *argv[3:]]).replace(str(work), "WORK")
                          .replace(str(images), "SKIMAGE_DATA"),
                          "exit_code": code, "seconds": round(seconds, 1),
                          "output": output.replace(str(work), "WORK").replace(str(images), "SKIMAGE_DATA")})
            if code != 0:
                break
        final = {}
        metrics = sorted((work / "runs").glob("*/metrics.jsonl"))
        if metrics:
            last = json.loads(metrics[0].read_text().splitlines()[-1])
            final = {key: last[key] for key in ("step", "tokens", "fvu", "l0", "dead")}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        evaluation = {}
        if (work / "encoded-eval" / "eval.json").is_file():
            done = json.loads((work / "encoded-eval" / "eval.json").read_text())
            evaluation = {key: done[key] for key in ("metrics", "latents", "downstream")}
        result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
                  "machine": {"node": platform.node(), "cpu": platform.machine(), "python": platform.python_version()},
                  "steps": steps, "final_metrics": final, "evaluation": evaluation}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0 if all(s["exit_code"] == 0 for s in steps) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
