"""Loopback load test of ``saeengine explore`` at a large synthetic size: p50 / p99 latency
of the main API calls with 8 concurrent clients for 30 s (issue 18).

    python benchmarks/explore_load.py [--tokens 1048576] [--d-sae 65536] [--k 16]
        [--tokens-per-image 64] [--clients 8] [--seconds 30] [--out FILE] [--keep DIR]

1. Writes a synthetic encode output (no model): random TopK codes in the encode format
   (codes.values / codes.indices [N, k], sources [N, 2]: images of 64 tokens on an 8x8
   grid), latent ids drawn from a power law so frequencies span decades like a trained
   SAE's (duplicates in a row become empty slots), and the per-latent statistics and
   exemplars computed by saeengine's own accumulators (LatentStats, Exemplars) over them.
   The summary names a store that does not exist: no images (thumbnails are heatmaps on
   white) and no model (the image page's intervention is not part of this test).
2. Starts ``python -m saeengine.cli explore DIR --port 0`` (a real uvicorn server on a
   free 127.0.0.1 port, its own process), waits for its URL, warms it with one request of
   each kind (not timed).
3. Runs one client alone for ``--baseline-seconds`` (the latency without contention), then
   ``--clients`` client processes, each with its own keep-alive HTTP connection, for
   ``--seconds``: each request is a random one of the calls below, with random arguments.
   Reports p50, p99, mean and count per endpoint, errors (any non-2xx) and the server's
   peak RSS.

Calls: GET /api/info; /api/latents (a random page of 100 rows, random sort and order,
random filter); /api/scatter (the alive latents: ~2^16 points); /api/latent/{j} (a random
alive latent: stats, histogram, exemplars, quantiles, co-activating latents); /api/thumb
(a random exemplar image with its latent's heatmap: the first request renders and caches
it); /api/images (a random page); POST /api/patches (a random image, 4 random patches).

Writes JSON (machine, versions, commit, date, settings, the table) to
benchmarks/results/<date>-cpu-explore-load.json by default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ENDPOINTS = ("info", "latents", "scatter", "latent", "thumb", "images", "patches")


# ----- the synthetic encode output ---------------------------------------------------------------
def write_synthetic(out: Path, *, tokens: int, d_sae: int, k: int, tokens_per_image: int, top_k: int = 16,
                    seed: int = 0, chunk: int = 1 << 16) -> Path:
    """An encode output folder of random codes (see the module docstring); returns it."""
    import torch
    from safetensors.torch import save_file

    from saeengine._atomic import atomic_write_bytes
    from saeengine.eval._json import jsonable
    from saeengine.eval.batch import TokenBatch
    from saeengine.eval.encoded import EXEMPLARS, FORMAT, HOLDS, INDICES, SOURCES, STATS, SUMMARY, VALUES, VERSION
    from saeengine.eval.exemplars import Exemplars
    from saeengine.eval.latent_stats import LatentStats

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    values = np.lib.format.open_memmap(out / VALUES, mode="w+", dtype=np.float32, shape=(tokens, k))
    indices = np.lib.format.open_memmap(out / INDICES, mode="w+", dtype=np.int32, shape=(tokens, k))
    sources = np.lib.format.open_memmap(out / SOURCES, mode="w+", dtype=np.int64, shape=(tokens, 2))
    stats, exemplars = LatentStats(d_sae), Exemplars(d_sae, top_k)
    permute = rng.permutation(d_sae)  # so frequency is not ordered by id
    chunk -= chunk % tokens_per_image  # whole images per chunk
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        # power law over latents: P(rank r) ~ r^(-0.8) roughly; frequencies span ~4 decades
        rank = np.minimum((d_sae * rng.random((n, k)) ** 2.2).astype(np.int64), d_sae - 1)
        idx = np.sort(permute[rank], axis=1)
        val = rng.gamma(2.0, 1.0, (n, k)).astype(np.float32) + 0.05
        dup = np.zeros_like(idx, dtype=bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        val[dup] = 0.0  # a repeated id in a row becomes an empty slot
        rows = np.arange(start, start + n)
        image, position = rows // tokens_per_image, rows % tokens_per_image
        values[start:start + n], indices[start:start + n] = val, idx.astype(np.int32)
        sources[start:start + n, 0], sources[start:start + n, 1] = image, position
        v, i = torch.from_numpy(val), torch.from_numpy(idx)
        stats.add(v, i)
        exemplars.update(TokenBatch(x=torch.zeros(n, 1), x_hat=torch.zeros(n, 1), values=v, indices=i,
                                    image=torch.from_numpy(image), position=torch.from_numpy(position),
                                    is_cls=torch.zeros(n, dtype=torch.bool), first_row=start))
    for array in (values, indices, sources):
        array.flush()
    result = {key: (t if isinstance(t, torch.Tensor) else torch.tensor(t)).contiguous()
              for key, t in stats.result().items()}
    save_file(result, str(out / STATS), metadata={"format": f"saeengine-{STATS}"})
    tables = {f"{rule}.{field}": t.contiguous() for rule, table in exemplars.result().items()
              for field, t in table.items()}
    save_file(tables, str(out / EXEMPLARS), metadata={"format": f"saeengine-{EXEMPLARS}"})
    n_images = (tokens + tokens_per_image - 1) // tokens_per_image
    summary = {
        "format": FORMAT, "version": VERSION,
        "sae": {"dir": None, "checksum": f"synthetic-{seed}", "architecture": "topk", "d_in": 0, "d_sae": d_sae,
                "config": {}},
        "store": {"dir": str(out / "no-store"), "content_hash": f"synthetic-{seed}", "backbone": "synthetic",
                  "layer": "blocks.0", "token_kind": "patch", "d_in": 0, "dtype": "float16", "n_tokens": tokens},
        "settings": {"batch_tokens": chunk, "top_k": top_k, "code_layout": "fixed", "code_width": k},
        "counts": {"tokens": tokens, "images": n_images, "image_ids": n_images, "d_sae": d_sae, "batches": 0,
                   "code_entries": 0},
        "metrics": jsonable({"fvu": None, "l0": float((np.asarray(values[:chunk]) > 0).sum(1).mean()),
                             "dead_fraction": float(result["dead_fraction"]),
                             "dense_fraction": float(result["dense_fraction"])}),
        "files": {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                         "holds": HOLDS.get(("fixed", name), HOLDS.get(name, ""))}
                  for name, a in ((VALUES, values), (INDICES, indices), (SOURCES, sources))},
    }
    atomic_write_bytes(out / SUMMARY, (json.dumps(summary, indent=1, allow_nan=False) + "\n").encode())
    return out


# ----- the server ---------------------------------------------------------------------------------
def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "saeengine.cli", "explore", str(directory), "--port", "0",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving on " in line:
            url = line.split("serving on ")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, url
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def peak_rss_mib(pid: int, field: str = "VmHWM") -> float | None:
    """The process's peak resident memory (VmHWM), or its current one (field="VmRSS")."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# ----- the clients --------------------------------------------------------------------------------
class Plan:
    """Random requests over what the server holds."""

    def __init__(self, info: dict, alive: list[int], exemplar_images: dict[int, list[int]]):
        self.info, self.alive, self.exemplar_images = info, alive, exemplar_images
        self.n_images, self.grid = info["n_images"], info["grid"]

    def request(self, rng: random.Random, kind: str) -> tuple[str, str, dict | None]:
        if kind == "info":
            return "GET", "/api/info", None
        if kind == "latents":
            sort = rng.choice(["id", "frequency", "mean", "max"])
            order, filt = rng.choice(["asc", "desc"]), rng.choice(["all", "all", "alive", "dense"])
            offset = rng.randrange(0, max(self.info["d_sae"] - 100, 1))
            return "GET", f"/api/latents?offset={offset}&limit=100&sort={sort}&order={order}&filter={filt}", None
        if kind == "scatter":
            return "GET", "/api/scatter", None
        if kind == "latent":
            return "GET", f"/api/latent/{rng.choice(self.alive)}", None
        if kind == "thumb":
            j = rng.choice(list(self.exemplar_images))
            return "GET", f"/api/thumb/{rng.choice(self.exemplar_images[j])}?latent={j}", None
        if kind == "images":
            return "GET", f"/api/images?offset={rng.randrange(0, max(self.n_images - 50, 1))}&limit=50", None
        n = self.grid[0] * self.grid[1]
        return "POST", "/api/patches", {"image": rng.randrange(self.n_images), "patches": rng.sample(range(n), 4)}


def _client(job: tuple) -> tuple[dict, list[str]]:
    """One client process: random requests over one keep-alive connection until ``stop``
    (a perf_counter deadline shared through fork); returns its latencies and errors."""
    import httpx

    url, plan, stop, seed = job
    rng = random.Random(seed)
    latencies: dict[str, list[float]] = {kind: [] for kind in ENDPOINTS}
    errors = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=60) as http:
        while time.time() < stop:
            kind = rng.choice(ENDPOINTS)
            method, path, body = plan.request(rng, kind)
            t0 = time.perf_counter()
            response = http.request(method, path, json=body)
            latencies[kind].append(time.perf_counter() - t0)
            if response.status_code >= 300:
                errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
    return latencies, errors


def run_clients(url: str, plan: Plan, clients: int, seconds: float, seed: int) -> tuple[dict, list[str]]:
    """``clients`` client processes (each its own interpreter: no shared GIL skews the
    timings) for ``seconds``; the latency table per endpoint."""
    import multiprocessing

    stop = time.time() + seconds + 1.0  # the pool's start-up is not part of the window
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        found = pool.map(_client, [(url, plan, stop, seed * 1000 + i) for i in range(clients)])
    latencies = {kind: [x for lat, _ in found for x in lat[kind]] for kind in ENDPOINTS}
    errors = [e for _, errs in found for e in errs]
    table = {}
    for kind, seen in latencies.items():
        ms = np.asarray(seen) * 1000
        table[kind] = {"requests": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 2) if ms.size else None,
                       "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
                       "mean_ms": round(float(ms.mean()), 2) if ms.size else None}
    return table, errors


def prepare(url: str) -> Plan:
    """The server's info, its alive latents and some exemplar images per latent (a warm-up
    request of every kind, untimed)."""
    import httpx

    with httpx.Client(base_url=url.rstrip("/"), timeout=300) as http:
        info = http.get("/api/info").json()
        alive = http.get("/api/scatter").json()["ids"]
        rng = random.Random(0)
        exemplar_images = {}
        for j in rng.sample(alive, min(64, len(alive))):
            page = http.get(f"/api/latent/{j}").json()
            images = [e["image"] for e in page["exemplars"]["patch"]]
            if images:
                exemplar_images[j] = images
        http.get("/api/latents?limit=100&sort=frequency&order=desc")
        http.get("/api/images?limit=50")
        http.post("/api/patches", json={"image": 0, "patches": [0, 1, 2, 3]})
    return Plan(info, alive, exemplar_images)


def machine() -> dict:
    import fastapi
    import torch
    import uvicorn

    return {"node": platform.node(), "cpu": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "system": platform.system(), "torch": torch.__version__,
            "numpy": np.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--d-sae", type=int, default=1 << 16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens-per-image", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0,
                        help="first, one client alone for this long: the latency without contention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="the JSON result (default: benchmarks/results/"
                                                               "<date>-cpu-explore-load.json)")
    parser.add_argument("--keep", type=Path, default=None, help="write the synthetic folder here and keep it")
    args = parser.parse_args(argv)
    from saeengine._atomic import atomic_write_bytes
    from saeengine.validation import current_commit

    date = dt.datetime.now(dt.timezone.utc)
    commit = current_commit()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        if not (folder / "summary.json").is_file():
            write_synthetic(folder, tokens=args.tokens, d_sae=args.d_sae, k=args.k,
                            tokens_per_image=args.tokens_per_image, seed=args.seed)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc, url = start_server(folder)
        try:
            started = time.perf_counter() - t0
            plan = prepare(url)
            rss_before = peak_rss_mib(proc.pid)
            single, single_errors = run_clients(url, plan, 1, args.baseline_seconds, args.seed + 1)
            table, errors = run_clients(url, plan, args.clients, args.seconds, args.seed)
            errors += single_errors
            rss = peak_rss_mib(proc.pid)
            rss_now = {field: peak_rss_mib(proc.pid, field) for field in ("VmRSS", "RssAnon", "RssFile")}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        mib = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    result = {
        "what": "saeengine explore under loopback load: a real uvicorn server (its own process), concurrent "
                "clients each with one keep-alive connection, random requests of the listed kinds",
        "date": date.isoformat(timespec="seconds"), "commit": commit, "machine": machine(),
        "command": "python benchmarks/explore_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"tokens": args.tokens, "d_sae": args.d_sae, "k": args.k, "tokens_per_image": args.tokens_per_image,
                     "n_images": plan.n_images, "alive_latents": len(plan.alive), "clients": args.clients,
                     "seconds": args.seconds, "folder_mib": round(mib, 1)},
        "build_s": round(built, 1), "server_start_s (incl. the latent index, built once)": round(started, 1),
        "server_peak_rss_mib": {"after_warmup": rss_before, "after_load": rss},
        "server_rss_mib_after_load": rss_now,  # RssFile: memory-mapped code and index pages (reclaimable)
        "endpoints": table, "one_client_alone": single, "errors": len(errors), "error_examples": errors[:5],
        "requests_per_s": round(sum(r["requests"] for r in table.values()) / args.seconds, 1),
    }
    out = args.out or HERE / "results" / f"{date:%Y-%m-%d}-cpu-explore-load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{'endpoint':10} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}   "
          f"one client alone: {'p50 ms':>8} {'p99 ms':>8}")
    for kind, row in table.items():
        alone = single[kind]
        print(f"{kind:10} {row['requests']:8d} {row['p50_ms'] or 0:8.1f} {row['p99_ms'] or 0:8.1f}   "
              f"{'':18}{alone['p50_ms'] or 0:8.1f} {alone['p99_ms'] or 0:8.1f}")
    print(f"errors: {len(errors)}; server peak RSS {rss} MiB; wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
