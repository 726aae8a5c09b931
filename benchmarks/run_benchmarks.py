"""Kernel benchmarks side by side with the baselines, stamped with GPU, versions and date.

    python benchmarks/run_benchmarks.py                 # the issue grid (needs a GPU)
    python benchmarks/run_benchmarks.py --smoke         # tiny shapes; runs on CPU too

Per (N, F) at d=1024, k=32, bf16 compute: the bf16 GEMM x W_enc^T alone; encode (no
grad) for each saeengine encoder implementation that runs here, by family (triton: the
fused kernel; cuda: chunked cuBLAS GEMM + the CUDA top-k select), the torch reference and
sparsify when installed;
forward + backward with AuxK (10% dead latents); peak memory; sparse decode bandwidth
for each backend. Each time is the median of triton.testing.do_bench (CUDA events, after
warm-up), with its 20th and 50th and 80th percentiles beside it (``<key>_q``). Writes
benchmarks/results/<date>-<gpu>.json (or --out) after every row, stamped with the commit,
and prints a table; ``"complete": false`` marks a file whose run was stopped early.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import saeengine
from saeengine import SAE, SAEConfig, ops

RESULTS = Path(__file__).resolve().parent / "results"


QUANTILES = (0.2, 0.5, 0.8)


def bench_quantiles(fn, device: torch.device) -> list[float]:
    """The 20th, 50th and 80th percentile milliseconds of fn() (CUDA events after warm-up
    on a GPU; on CPU, where work is synchronous and only the scripts' smoke modes run, the
    host clock over 3 runs after one warm-up: interpreted kernels take seconds a call)."""
    if device.type == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))]
    times = []
    for i in range(4):
        start = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # linear, as do_bench's torch.quantile
    return [deciles[round(q * 10) - 1] for q in QUANTILES]


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn()."""
    return bench_quantiles(fn, device)[1]


def peak_gb(fn, device: torch.device, module: torch.nn.Module) -> float | None:
    """GB one call of fn needs on its own: the module's parameters plus the peak of what
    the call allocates on top of what was already allocated (so another system's weights
    held by the benchmark do not count). Gradients are dropped first, so the step's
    gradient buffers count as its own."""
    if device.type != "cuda":
        return None
    module.zero_grad(set_to_none=True)  # gradients left by the timing runs would hide the step's own
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return (torch.cuda.max_memory_allocated() - before + params) / 1e9


def _import_sparse_coder():
    """sparsify's SparseCoder classes, or None when sparsify is not installed.

    sparsify/__init__.py also imports its trainer (datasets, schedulefree, ...), which a
    benchmark machine may lack; the sparse coder itself needs none of that, so when the
    package import fails its modules are loaded under an empty package instead."""
    import importlib.util
    import types

    try:
        from sparsify.sparse_coder import SparseCoder, SparseCoderConfig
        return SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            return None
    for name in [m for m in sys.modules if m == "sparsify" or m.startswith("sparsify.")]:
        del sys.modules[name]
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = package
    from sparsify.sparse_coder import SparseCoder, SparseCoderConfig
    return SparseCoder, SparseCoderConfig


def sparsify_coder(d: int, f: int, k: int, device):
    try:
        classes = _import_sparse_coder()
    except Exception as exc:  # noqa: BLE001 - a broken install leaves the column empty, said once
        print(f"sparsify could not be imported: {type(exc).__name__}: {exc}", file=sys.stderr)
        classes = None
    if classes is None:  # not installed: the column stays empty
        return None
    SparseCoder, SparseCoderConfig = classes
    try:
        return SparseCoder(d, SparseCoderConfig(num_latents=f, k=k), device=device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def sparsify_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eai-sparsify")
    except PackageNotFoundError:
        return None


def error_text(exc: BaseException) -> str:
    """How a failed measurement is recorded in the results."""
    return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def measure_into(row: dict, key: str, fn, device: torch.device, memory_key: str | None = None,
                 module: torch.nn.Module | None = None) -> None:
    """row[key] = median ms of fn, row[key + "_q"] = its [20th, 50th, 80th] percentiles (and
    row[memory_key] = its peak GB); "OOM" when it does not fit, and "error: ..." when it
    fails otherwise (one failing variant must not take the rest of the row with it)."""
    try:
        row[f"{key}_q"] = bench_quantiles(fn, device)
        row[key] = row[f"{key}_q"][1]
        if memory_key:
            row[memory_key] = peak_gb(fn, device, module)
    except torch.OutOfMemoryError:
        row[key] = "OOM"
    except Exception as exc:  # noqa: BLE001 - recorded in the results instead
        row[key] = error_text(exc)
    finally:
        if device.type == "cuda" and not isinstance(row.get(key), float):
            torch.cuda.empty_cache()


def host_syncs(fn) -> int | str:
    """How many ops in one call of fn make the GPU wait on the host (saeengine.syncs), or
    "error: ..." when the call fails."""
    from saeengine.syncs import count_host_syncs

    try:
        with count_host_syncs() as syncs:
            fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the results instead
        return error_text(exc)
    return syncs.total


def implementations_here(op: str, device: torch.device) -> list[str]:
    """The implementations of ``op`` that run on ``device``, as result columns and backend=
    arguments: by family ("torch", "triton", "cuda"), which the SAE's backend= takes too and
    which names the same columns in every result file; by name where a family has several
    (the reference keeps "torch": backend="torch" names it, and older files call it so)."""
    from saeengine.backends import IMPLEMENTATIONS, implementation

    families = [impl.family for impl in IMPLEMENTATIONS[op]]
    labels = []
    for name in saeengine.available_backends(op, device):
        family = implementation(op, name).family
        labels.append("torch" if name == "reference" else family if families.count(family) == 1 else name)
    return labels


def gpu_encoder_backends(device: torch.device) -> list[str]:
    """saeengine's own encoder implementations that run on this GPU (none on CPU, where the
    Triton interpreter is a testing tool; the torch reference is the baseline)."""
    if device.type != "cuda":
        return []
    return [name for name in implementations_here("topk_encode", device) if name != "torch"]


def _gemm_and_encode(row: dict, x: torch.Tensor, sae: SAE, k: int, device: torch.device) -> None:
    """The GEMM alone and encode (no grad) per backend; the cast weights die on return."""
    n, f, d = x.shape[0], sae.cfg.d_sae, sae.cfg.d_in
    W, b = sae.W_enc.detach().to(x.dtype), sae.b_enc.detach().to(x.dtype)
    measure_into(row, "gemm_ms", lambda: x @ W.T, device)
    if isinstance(row["gemm_ms"], float):
        row["gemm_tflops"] = 2 * n * f * d / row["gemm_ms"] / 1e9
    with torch.no_grad():
        for backend in ["torch"] + gpu_encoder_backends(device):
            measure_into(row, f"encode_{backend}_ms",
                         lambda: ops.topk_encode(x, W, b, k, backend=backend, check=False), device)


def best_of(row: dict, prefix: str, backends: list[str]) -> tuple[str, float] | None:
    """(backend, ms) of the fastest measured ``{prefix}_{backend}_ms``."""
    measured = [(row[f"{prefix}_{b}_ms"], b) for b in backends if isinstance(row.get(f"{prefix}_{b}_ms"), float)]
    return (min(measured)[1], min(measured)[0]) if measured else None


def summarize(row: dict, backends: list[str]) -> None:
    """Ours = the fastest of saeengine's GPU backends; ratios against the GEMM and the baselines."""
    for prefix in ("encode", "fwd_bwd"):
        best = best_of(row, prefix, backends)
        if best is None:
            continue
        row[f"{prefix}_best_backend"], row[f"{prefix}_best_ms"] = best
        for other in ("sparsify", "torch"):
            theirs = row.get(f"{prefix}_{other}_ms")
            if isinstance(theirs, float):
                row[f"{prefix}_speedup_vs_{other}"] = theirs / best[1]
        if prefix == "encode" and isinstance(row.get("gemm_ms"), float):
            row["encode_over_gemm"] = best[1] / row["gemm_ms"]


def encode_rows(n: int, f: int, d: int, k: int, device: torch.device, dtype: torch.dtype) -> dict:
    x = torch.randn(n, d, device=device, dtype=dtype)
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device=device, seed=0)
    row: dict = {"N": n, "F": f, "d": d, "k": k, "dtype": str(dtype).removeprefix("torch.")}
    _gemm_and_encode(row, x, sae, k, device)
    coder = sparsify_coder(d, f, k, device)
    if coder is not None:
        def sparsify_encode():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                coder.encode(x.float())
        measure_into(row, "encode_sparsify_ms", sparsify_encode, device)

    # Forward + backward with AuxK over 10% dead latents, bf16 autocast, no optimizer step.
    dead = torch.rand(f, device=device) < 0.1
    xf = x.float()

    def step(backend):
        def run():
            sae.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = sae(xf, dead_mask=dead, backend=backend, check=False)
            out.loss.backward()
        return run

    ours = gpu_encoder_backends(device)
    for backend in ["torch"] + ours:
        measure_into(row, f"fwd_bwd_{backend}_ms", step(backend), device, f"peak_gb_{backend}", sae)
        sae.zero_grad(set_to_none=True)
    if coder is not None:
        def sparsify_step():
            coder.zero_grad(set_to_none=True)
            out = coder(xf, dead_mask=dead)  # its forward runs under bf16 autocast itself
            (out.fvu + out.auxk_loss / 32).backward()
        measure_into(row, "fwd_bwd_sparsify_ms", sparsify_step, device, "peak_gb_sparsify", coder)
        coder.zero_grad(set_to_none=True)
        del coder
    summarize(row, ours)
    return row


def decode_rows(n: int, f: int, d: int, k: int, device: torch.device, dtype: torch.dtype,
                copy_gbps: float | None) -> dict:
    values = torch.rand(n, k, device=device, dtype=dtype)
    indices = torch.randint(0, f, (n, k), device=device)
    W = torch.randn(f, d, device=device, dtype=dtype)
    row: dict = {"N": n, "F": f, "d": d, "k": k, "dtype": str(dtype).removeprefix("torch.")}
    gathered_bytes = n * k * d * W.element_size()
    for backend in implementations_here("sparse_decode", device):
        measure_into(row, f"decode_{backend}_ms",
                     lambda: ops.sparse_decode(values, indices, W, backend=backend, check=False), device)
        ms = row[f"decode_{backend}_ms"]
        if not isinstance(ms, float):
            continue
        row[f"decode_{backend}_gbps"] = gathered_bytes / ms / 1e6
        if copy_gbps:
            row[f"decode_{backend}_of_copy_bw"] = row[f"decode_{backend}_gbps"] / copy_gbps
    return row


def guarded(measure, n: int, f: int, *args) -> dict:
    """One grid row; an unexpected failure is recorded in the row instead of ending the run."""
    try:
        return measure(n, f, *args)
    except Exception as exc:  # noqa: BLE001 - the table must still come out
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"N": n, "F": f, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def copy_bandwidth_gbps(device: torch.device) -> float | None:
    """Measured device-to-device copy, bytes read + written (the memory roofline)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / ms / 1e6


def stamp(device: torch.device) -> dict:
    """Date, commit (``saeengine.validation.current_commit``), versions and the device."""
    import triton

    from saeengine.validation import current_commit

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": current_commit(),
            "saeengine": saeengine.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "device": str(device), "sparsify": sparsify_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def print_table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(keys))
    for row in rows:
        cells = []
        for key in keys:
            v = row.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (any device); results are written only to an explicit --out")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<date>-<gpu>.json)")
    parser.add_argument("--shapes", default=None, help="comma-separated NxF (default: the issue grid)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("run_benchmarks.py: no GPU visible; the benchmark grid needs one (use --smoke to check the script)",
              file=sys.stderr)
        return 2
    d, k = (64, 8) if args.smoke else (1024, 32)
    grid = [(256, 2**10)] if args.smoke else [(4096, 2**16), (4096, 2**18), (4096, 2**20),
                                              (16384, 2**16), (16384, 2**18), (16384, 2**20)]
    if args.shapes:
        grid = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = stamp(device)
    copy_gbps = copy_bandwidth_gbps(device)
    meta["copy_gbps"] = copy_gbps
    path = args.out
    if path is None and not args.smoke:
        path = RESULTS / f"{meta['date'][:10]}-{(meta.get('gpu') or 'cpu').replace(' ', '-')}.json"
    encode, decode = [], []

    def save(complete: bool) -> None:  # after every row: a stopped run keeps what it measured
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"meta": meta, "complete": complete, "encode": encode, "decode": decode},
                                       indent=2) + "\n")

    for n, f in grid:
        encode.append(guarded(encode_rows, n, f, d, k, device, dtype))
        print(json.dumps(encode[-1]), flush=True)
        save(False)
    for n, f in grid[:2]:
        decode.append(guarded(decode_rows, n, f, d, k, device, dtype, copy_gbps))
        save(False)
    save(True)
    print(json.dumps(meta))
    print_table(encode, ["N", "F", "gemm_ms", "encode_triton_ms", "encode_cuda_ms", "encode_over_gemm",
                         "encode_torch_ms", "encode_sparsify_ms", "fwd_bwd_triton_ms", "fwd_bwd_cuda_ms",
                         "fwd_bwd_sparsify_ms", "fwd_bwd_speedup_vs_sparsify", "fwd_bwd_torch_ms",
                         "peak_gb_triton", "peak_gb_cuda", "peak_gb_sparsify"])
    print_table(decode, ["N", "F"] + [key for key in decode[0] if key.startswith("decode_") and not key.endswith("_q")])
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
