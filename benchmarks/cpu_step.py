"""One TopK training step on CPU (forward + backward + optimizer), saeengine's CPU
implementations against EleutherAI sparsify, on the same machine, in the same process,
with the same threads and the same batch, runs interleaved.

    SPARSIFY_DISABLE_TRITON=1 /tmp/peers-venv/bin/python benchmarks/cpu_step.py \\
        [--d-in 256] [--k 32] [--batch 1024] [--d-sae 4096 16384] [--threads 1] [--repeats 15] \\
        [--out benchmarks/results/<date>-cpu-step.json]

Run it with a python where ``eai-sparsify`` imports (saeengine is imported from this
checkout); without sparsify only saeengine's rows are timed.

Timed, per step (``time.perf_counter`` around it, CPU work is synchronous):
- saeengine: ``saeengine.trainer.TrainStep`` (the trainer's own step: learning rate,
  forward with the fired-latent bookkeeping, backward, the optimizer with its
  constraints) for each backend ("cpu": the sparse backward in torch ops, "auto"'s choice
  on CPU; "torch": the dense-autograd reference) and each optimizer ("adam": DenseAdam,
  "row_sparse_adam"). Fresh SAE, so nothing is dead and AuxK does not run (as for sparsify).
- sparsify: ``SparseCoder(d_in, SparseCoderConfig(num_latents=F, k=k))``, its forward,
  ``(fvu + auxk_loss / 32).backward()``, ``remove_gradient_parallel_to_decoder_directions``,
  ``torch.optim.Adam.step`` and ``set_decoder_norm_to_unit_norm`` (what its trainer does
  per step with optimizer="adam").
Two warm-up steps each, then ``repeats`` rounds, each round one step of every entry in
turn; the 20/50/80 % quantiles of the step times; ``ratio_to_sparsify`` = median / sparsify's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402

import saeengine  # noqa: E402
from saeengine.trainer import TrainStep  # noqa: E402


def saeengine_step(d_in: int, d_sae: int, k: int, batch: torch.Tensor, backend: str, optimizer: str):
    cfg = saeengine.TrainConfig(d_sae=d_sae, k=k, batch_size=batch.shape[0], total_tokens=batch.shape[0] * 10**6,
                                optimizer=optimizer, backend=backend, progress=False, resume=False,
                                out_dir="/tmp/saeengine-cpu-step")
    sae = saeengine.SAE(cfg.sae_config(d_in), seed=0)
    step = TrainStep(sae, cfg)
    return lambda: step(batch)


def sparsify_step(d_in: int, d_sae: int, k: int, batch: torch.Tensor):
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)

    def step():
        out = sae(batch)
        opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return step


def quantiles(times: list[float]) -> dict:
    q20, q50, q80 = (float(q) for q in torch.quantile(torch.tensor(times, dtype=torch.float64),
                                                      torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)))
    return {"q20_ms": 1e3 * q20, "median_ms": 1e3 * q50, "q80_ms": 1e3 * q80}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        from importlib.metadata import version

        import sparsify  # noqa: F401
        sparsify_version = version("eai-sparsify")
    except ImportError:
        sparsify_version = None
        print("sparsify is not importable here: timing saeengine only", file=sys.stderr)
    batch = torch.randn(a.batch, a.d_in, generator=torch.Generator().manual_seed(0))
    results = {}
    for d_sae in a.d_sae:
        entries = {f"saeengine {backend} {opt}": saeengine_step(a.d_in, d_sae, a.k, batch, backend, opt)
                   for backend in ("cpu", "torch") for opt in ("adam", "row_sparse_adam")}
        if sparsify_version:
            entries["sparsify adam"] = sparsify_step(a.d_in, d_sae, a.k, batch)
        for step in entries.values():  # warm-up
            step()
            step()
        times = {name: [] for name in entries}
        for _ in range(a.repeats):
            for name, step in entries.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        rows = {name: {**quantiles(t), "times_s": t} for name, t in times.items()}
        if sparsify_version:
            base = rows["sparsify adam"]["median_ms"]
            for row in rows.values():
                row["ratio_to_sparsify"] = row["median_ms"] / base
        results[str(d_sae)] = rows
        for name, row in rows.items():
            ratio = f"  ratio {row['ratio_to_sparsify']:.2f}" if "ratio_to_sparsify" in row else ""
            print(f"F={d_sae:6d}  {name:34s} q20 {row['q20_ms']:7.1f}  median {row['median_ms']:7.1f}  "
                  f"q80 {row['q80_ms']:7.1f} ms{ratio}", flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"node": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "system": platform.system(),
                    "load_average_at_end": list(os.getloadavg())},
        "versions": {"torch": torch.__version__, "saeengine": saeengine.__version__, "eai-sparsify": sparsify_version},
        "settings": {"what": "one TopK training step: forward + backward + optimizer (see benchmarks/cpu_step.py)",
                     "d_in": a.d_in, "k": a.k, "batch": a.batch, "d_sae": a.d_sae, "torch_threads": a.threads,
                     "repeats": a.repeats, "interleaved": True, "sparsify_triton_disabled":
                         os.environ.get("SPARSIFY_DISABLE_TRITON") == "1"},
        "results": results,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
