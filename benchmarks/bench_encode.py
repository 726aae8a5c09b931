"""The encode pass (saeengine.eval.encode): tokens/s, and peak memory at N vs 10 N tokens
(issue 15: memory must not grow with the tokens; 10x the tokens, peak RSS within 10%).

    python benchmarks/bench_encode.py [--tokens 40000] [--d-in 256] [--d-sae 8192] [--k 32]
        [--memory-tokens 16384] [--device cpu] [--out FILE]

Writes random stores (float16, images of 50 tokens: a CLS token and 49 patches) and a
random TopK SAE into a temporary folder, then encodes each store in a fresh subprocess
and reads the child's own peak RSS (VmHWM) and the pass's wall time (the SAE loaded, the
store opened, then encode_store timed alone; on a GPU the pass ends with a copy to the
host, so the clock stops after the GPU's work). On the CPU it also says where the time
went (``seconds_in``: encode, decode, each accumulator, the rest). The pass drops the
store's memory-mapped pages once past each shard, so only about one shard of them counts
in RSS (``store_mib`` says how much the whole store is); ``peak_anon`` is the process's own
memory alone (RssAnon, sampled every 2 ms). The two memory children run at the same time.
Prints and writes JSON: machine, torch, commit, date, settings, tokens/s, both peaks and
their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "2026-12-01-cpu-encode.json"
TOKENS_PER_IMAGE = 50


def write_store(directory: Path, tokens: int, d_in: int, seed: int = 0, shard_tokens: int = 1 << 16) -> Path:
    """A finished store of ``tokens`` random rows, TOKENS_PER_IMAGE per image (the last may be shorter)."""
    from saeengine.store import ActivationWriter

    rng = np.random.default_rng(seed)
    kinds = ["cls"] + ["patch"] * (TOKENS_PER_IMAGE - 1)
    with ActivationWriter(directory, d_in=d_in, dtype="float16", backbone="random", layer="blocks.0",
                          token_kind="cls+patch", extra={"token_kinds": kinds}, shard_tokens=shard_tokens) as writer:
        for start in range(0, tokens, 1 << 14):
            rows = np.arange(start, min(start + (1 << 14), tokens))
            acts = rng.standard_normal((rows.size, d_in), dtype=np.float32)
            writer.add(acts, rows // TOKENS_PER_IMAGE, rows % TOKENS_PER_IMAGE)
    return directory


def write_sae(directory: Path, d_in: int, d_sae: int, k: int, seed: int = 0) -> Path:
    from saeengine import SAE, SAEConfig

    SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k), seed=seed).save(directory)
    return directory


def child(store: str, sae: str, out: str, batch_tokens: int, top_k: int, device: str, threads: int) -> None:
    """Encode ``store`` and print this process's peak RSS and the pass's wall time as JSON."""
    import time

    import torch

    sys.path.insert(0, str(HERE.parent))
    from saeengine import SAE
    from saeengine.eval.encode import encode_store
    from saeengine.store import ActivationStore

    if threads:
        torch.set_num_threads(threads)
    model, data = SAE.load(sae, device), ActivationStore(store)
    spent = timed_parts(model) if device == "cpu" else {}
    before = status_mib("VmHWM")
    anon = AnonymousPeak()
    start = time.perf_counter()
    with anon:
        encoded = encode_store(model, data, out, batch_tokens=batch_tokens, top_k=top_k, device=device,
                               progress=False, sae_dir=sae)
    wall = time.perf_counter() - start
    if spent:
        spent["reads, writes, commits, rest"] = wall - sum(spent.values())
    print(json.dumps({"peak_rss_mib": status_mib("VmHWM"),
                      "rss_before_pass_mib": before, "peak_anon_mib": anon.peak_mib, "anon_before_pass_mib":
                      anon.before_mib, "wall_s": wall, "seconds_in": {k: round(v, 2) for k, v in spent.items()},
                      "tokens": encoded.n_tokens, "fvu": encoded.metrics["fvu"], "l0": encoded.metrics["l0"]}))


def timed_parts(model) -> dict[str, float]:
    """Seconds spent in the SAE's encode and decode and in each accumulator's update, filled
    in as the pass runs (CPU only: there every call is synchronous)."""
    import time

    from saeengine.eval import encode as encode_module

    spent: dict[str, float] = {}

    def timed(name, call):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return run

    model.encode, model.decode = timed("sae.encode", model.encode), timed("sae.decode", model.decode)
    make = encode_module.make_accumulators

    def accumulators(d_sae, top_k):
        made = make(d_sae, top_k)
        for name, acc in made.items():
            acc.update = timed(f"{name}.update", acc.update)
        return made

    encode_module.make_accumulators = accumulators
    return spent


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB (Linux; ru_maxrss elsewhere). VmHWM, not
    ru_maxrss, is this process's own peak RSS: Linux carries the parent's peak over into
    ru_maxrss across fork and exec, and the parent here has just written the stores."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


class AnonymousPeak:
    """The largest RssAnon of this process (Linux /proc/self/status) seen every 2 ms inside
    the ``with`` body: the process's own memory, without the file pages it maps (the
    store's, read as the pass goes, are the page cache's)."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.before_mib, self.peak_mib = every_s, self.read(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def read() -> float:
        return status_mib("RssAnon")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.read())
            self._stop.wait(self.every_s)

    def __enter__(self) -> "AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.read())


def _child_command(store: Path, sae: Path, out: Path, batch_tokens: int, top_k: int, device: str,
                   threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(store), str(sae), str(out),
            "--batch-tokens", str(batch_tokens), "--top-k", str(top_k), "--device", device, "--threads", str(threads)]


def measure(*runs: tuple) -> list[dict]:
    """Run one child per ``(store, sae, out, batch_tokens, top_k, device, threads)``, all at
    once (each measures its own peak), and return their JSON results in order."""
    children = [subprocess.Popen(_child_command(*run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for run in runs]
    results = []
    for child in children:
        out, err = child.communicate(timeout=600)
        if child.returncode:
            raise RuntimeError(f"encode child failed ({child.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def memory(workdir: Path, tokens: int, factor: int = 10, d_in: int = 16, d_sae: int = 256, k: int = 8,
           batch_tokens: int = 2048, top_k: int = 16, threads: int = 1, shard_tokens: int = 4096) -> dict:
    """Peak RSS of encoding ``tokens`` and ``factor * tokens`` tokens, each in a fresh process.
    Both stores have shards of ``shard_tokens`` rows: the store checks a shard's checksum
    on its first read, reading up to 16 MiB at a time, so bigger shards would cost memory
    of their own."""
    sae = write_sae(workdir / "mem-sae", d_in, d_sae, k)
    sizes = {"N": tokens, "factorN": tokens * factor}
    stores = {name: write_store(workdir / f"mem-store-{name}", n, d_in, shard_tokens=shard_tokens)
              for name, n in sizes.items()}
    found = measure(*[(stores[name], sae, workdir / f"mem-out-{name}", batch_tokens, top_k, "cpu", threads)
                      for name in sizes])
    runs = dict(zip(sizes, found))
    for name, n in sizes.items():
        assert runs[name]["tokens"] == n, runs[name]
        runs[name]["store_mib"] = n * (d_in * 2 + 16) / 2**20  # activations + sources, mapped as read
    a, b = runs["N"], runs["factorN"]
    return {"what": "peak RSS of the encode process, N vs factor*N tokens", "N": tokens, "factor": factor,
            "d_in": d_in, "d_sae": d_sae, "k": k, "batch_tokens": batch_tokens, "top_k": top_k,
            "peak_rss_mib_N": round(a["peak_rss_mib"], 1), "peak_rss_mib_factorN": round(b["peak_rss_mib"], 1),
            "peak_anon_mib_N": round(a["peak_anon_mib"], 1), "peak_anon_mib_factorN": round(b["peak_anon_mib"], 1),
            "anon_before_pass_mib_N": round(a["anon_before_pass_mib"], 1),
            "anon_before_pass_mib_factorN": round(b["anon_before_pass_mib"], 1),
            "wall_s_N": round(a["wall_s"], 2), "wall_s_factorN": round(b["wall_s"], 2),
            "rss_before_pass_mib_N": round(a["rss_before_pass_mib"], 1),
            "rss_before_pass_mib_factorN": round(b["rss_before_pass_mib"], 1),
            "store_mib_N": round(a["store_mib"], 1), "store_mib_factorN": round(b["store_mib"], 1),
            "ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 4),
            "anon_ratio": round(b["peak_anon_mib"] / a["peak_anon_mib"], 4), "target_ratio": 1.1}


def throughput(workdir: Path, tokens: int, d_in: int, d_sae: int, k: int, batch_tokens: int, top_k: int,
               device: str, threads: int) -> dict:
    store = write_store(workdir / "speed-store", tokens, d_in)
    sae = write_sae(workdir / "speed-sae", d_in, d_sae, k)
    run, = measure((store, sae, workdir / "speed-out", batch_tokens, top_k, device, threads))
    return {"what": "encode_store wall time (SAE loaded, store opened), random TopK SAE and store",
            "device": device, "torch_threads": threads or "default", "tokens": tokens, "d_in": d_in, "d_sae": d_sae,
            "k": k, "batch_tokens": batch_tokens, "top_k": top_k, "wall_s": round(run["wall_s"], 2),
            "tokens_per_s": round(tokens / run["wall_s"]), "seconds_in": run["seconds_in"],
            "peak_rss_mib": round(run["peak_rss_mib"], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=40_000, help="tokens of the throughput store")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--memory-tokens", type=int, default=16_384,
                        help="N of the memory check (d_sae 1024; 0: skip it)")
    parser.add_argument("--memory-batch-tokens", type=int, default=2048,
                        help="batch of the memory check: N must span several batches, since memory settles at "
                             "its level over the first two")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULT, help="write the JSON result here")
    parser.add_argument("--child", nargs=3, metavar=("STORE", "SAE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.batch_tokens, args.top_k, args.device, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        from saeengine.validation import run_stamp  # the date, commit, versions and machine
        result = {**run_stamp(), "throughput": throughput(Path(tmp), args.tokens, args.d_in, args.d_sae, args.k,
                                                      args.batch_tokens, args.top_k, args.device, args.threads)}
        if args.memory_tokens:
            result["memory"] = memory(Path(tmp), args.memory_tokens, d_in=args.d_in, d_sae=1024, k=args.k,
                                      batch_tokens=args.memory_batch_tokens, top_k=args.top_k)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
