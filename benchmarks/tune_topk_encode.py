"""Tile-shape and method sweep for the fused top-k encoder, plus a per-kernel breakdown.

    python benchmarks/tune_topk_encode.py --out tune.json      # needs a GPU
    python benchmarks/tune_topk_encode.py --smoke --out t.json # tiny shapes; runs on CPU (checks the script)

For each (N, F) at d=1024, k=32, bf16:
- the cuBLAS GEMM x W^T alone;
- every tiling in TILINGS of the fused kernel;
- the chunked GEMM + top-k select encoder (implementation "chunked") per chunk size, overlap and
  per-chunk select;
- forward + backward with the AuxK code through dense GEMMs against the sparse kernels.
Each variant's top-k is checked against torch.topk on the same bf16 pre-activations (the
fraction of rows whose index sets match, ties aside) before it is timed. Then a
torch.profiler breakdown of one encode and of one forward + backward step (AuxK, 10%
dead) for the triton and cuda backends. Each time is the median ("ms") with its [20th, 50th,
80th] percentiles ("ms_q"); the JSON, stamped with the commit, is rewritten after each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

# The script runs where it finds itself: on the GPU, else (--smoke only) on CPU with the
# Triton kernels interpreted, which must be switched on before they are defined.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # the interpreter computes in fp32
SELECTS = ("cuda", "torch") if DEVICE.type == "cuda" else ("torch",)  # topk_select backends per chunk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import bench_quantiles, error_text, stamp  # noqa: E402

import saeengine  # noqa: E402
from saeengine import SAE, SAEConfig  # noqa: E402
from saeengine.ops import topk_encode_ref, topk_select  # noqa: E402
from saeengine.ops.topk_encode.chunked import chunk_columns, chunked_topk_encode  # noqa: E402
from saeengine.kernels.sparse_decode import sparse_decode_forward  # noqa: E402
from saeengine.kernels.topk_encode import EncodeTiling, topk_encode_forward  # noqa: E402

T = EncodeTiling
TILINGS = [
    T(64, 128, 64, 4, 3),
    T(64, 128, 64, 4, 4),
    T(64, 128, 64, 4, 2),
    T(64, 128, 128, 4, 3),
    T(64, 128, 32, 4, 4),
    T(64, 64, 64, 4, 4),
    T(64, 256, 64, 4, 3),
    T(128, 128, 64, 4, 3),
    T(128, 256, 64, 8, 3),
]
DECODE_OPTIONS = [dict(unroll=8, block_d=1024, num_warps=4), dict(unroll=4, block_d=1024, num_warps=4),
                  dict(unroll=16, block_d=1024, num_warps=4), dict(unroll=8, block_d=512, num_warps=2),
                  dict(unroll=8, block_d=1024, num_warps=8)]


def timed(row: dict, fn) -> float:
    """row["ms"] = the median ms of fn, row["ms_q"] = its [20th, 50th, 80th] percentiles."""
    row["ms_q"] = bench_quantiles(fn, DEVICE)
    row["ms"] = row["ms_q"][1]
    return row["ms"]


def agreement(values, indices, pre) -> float:
    """Fraction of rows whose chosen set equals torch.topk's, or whose k-th value ties."""
    ref_v, ref_i = pre.topk(values.shape[1], dim=1)
    same = (indices.sort(1).values == ref_i.sort(1).values).all(1)
    tie = (values[:, -1].float() - ref_v[:, -1].float()).abs() <= 1e-2 * ref_v[:, -1].float().abs().clamp_min(1e-3)
    return float((same | tie).float().mean())


AUX_K = 512  # the AuxK width at d=1024 (d/2)


def sweep(n: int, f: int, d: int, k: int, sections: set[str], tilings: list = TILINGS,
          aux_k: int = AUX_K) -> list[dict]:
    x = torch.randn(n, d, device=DEVICE, dtype=DTYPE)
    W = (torch.randn(f, d, device=DEVICE) / d**0.5).to(DTYPE)
    b = (0.01 * torch.randn(f, device=DEVICE)).to(DTYPE)
    rows = [{"N": n, "F": f, "variant": "cublas_gemm", "over_gemm": 1.0}]
    gemm = timed(rows[0], lambda: x @ W.T)
    pre = torch.relu(x @ W.T + b)
    for tiling in tilings if "encode" in sections else ():
        row = {"N": n, "F": f, "variant": "/".join(map(str, tiling))}
        try:
            v, i = topk_encode_forward(x, W, b, k, tiling=tiling)
            row["agree"] = agreement(v, i, pre)
            timed(row, lambda: topk_encode_forward(x, W, b, k, tiling=tiling))
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:  # a tiling may not compile (shared memory, registers)
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # sparse decode (k = 32 and the AuxK width 512) against the CUDA kernel when built
    for kk in (k, aux_k) if "decode" in sections else ():
        values = torch.rand(n, kk, device=DEVICE, dtype=DTYPE)
        indices = torch.randint(0, f, (n, kk), device=DEVICE)
        cuda_op = getattr(torch.ops.saeengine, "sparse_decode", None) if saeengine._native.load_extension()[0] else None
        if cuda_op is not None and DEVICE.type == "cuda":
            row = {"N": n, "F": f, "variant": f"decode_k{kk}:cuda"}
            timed(row, lambda: cuda_op(values, indices, W, None))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for options in DECODE_OPTIONS:
            row = {"N": n, "F": f, "variant": f"decode_k{kk}:" + "/".join(str(v) for v in options.values())}
            timed(row, lambda: sparse_decode_forward(values, indices, W, **options))
            row["gbps"] = n * kk * d * 2 / row["ms"] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    # AuxK pass: k_aux = 512 over the 10% dead latents
    dead = torch.nonzero(torch.rand(f, device=DEVICE) < 0.1).squeeze(1)
    if "auxk" in sections:  # the dense selection the ops layer uses for wide subset codes
        row = {"N": n, "F": f, "variant": f"auxk{aux_k}:dense_gemm+torch.topk"}
        timed(row, lambda: topk_encode_ref(x, W, b, aux_k, latent_subset=dead))
        row["over_gemm"] = row["ms"] / gemm
        rows.append(row)
        print(json.dumps(row), flush=True)
    aux_tilings = [T(), T(64, 64, 64, 4, 3)]
    for tiling in aux_tilings if "auxk" in sections else ():
        row = {"N": n, "F": f, "variant": f"auxk{aux_k}:" + "/".join(map(str, tiling))}
        try:
            v, i = topk_encode_forward(x, W, b, aux_k, latent_subset=dead, tiling=tiling)
            row["agree"] = agreement(v, torch.searchsorted(dead, i), pre[:, dead])
            timed(row, lambda: topk_encode_forward(x, W, b, aux_k, latent_subset=dead, tiling=tiling))
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "gemm" in sections:
        rows += gemm_variants(n, f, k, x, W, b, dead, pre, gemm, aux_k)
    if "auxk" in sections:
        rows += auxk_step_variants(n, f, d, k)
    return rows


def auxk_step_variants(n, f, d, k) -> list[dict]:
    """Forward + backward (10% dead, bf16 autocast) with the AuxK code through dense GEMMs
    over the dead latents against the sparse kernels, per encoder backend."""
    from saeengine.ops.topk_encode import dense_auxk

    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device=DEVICE, seed=0)
    x = torch.randn(n, d, device=DEVICE)
    dead = torch.rand(f, device=DEVICE) < 0.1
    dead_list = torch.nonzero(dead).squeeze(1)  # listed ahead, as the trainer does
    rows, default_ratio = [], dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K
    for backend in ("triton", "cuda"):
        for label, ratio in (("dense", 10**9), ("sparse", 0)):
            def step():
                sae.zero_grad(set_to_none=True)
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
                    out = sae(x, dead_latents=dead_list, backend=backend, check=False)
                out.loss.backward()
            row = {"N": n, "F": f, "variant": f"fwd_bwd:{backend}:auxk_{label}"}
            dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K = ratio
            try:
                timed(row, step)
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                row["error"] = error_text(exc)
            finally:
                dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K = default_ratio
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


GEMM_CHUNK_MB = (64, 256, 1024)


def gemm_variants(n, f, k, x, W, b, dead, pre, gemm, aux_k=AUX_K) -> list[dict]:
    """The chunked cuBLAS GEMM + top-k select encoder (backend "cuda"): chunk sizes, the
    side-stream overlap, CUDA against torch.topk per chunk; one chunk's GEMM and select
    alone; and the AuxK code (k=aux_k over the dead latents) through it."""
    rows = []

    def record(variant, fn, check=None):
        row = {"N": n, "F": f, "variant": variant}
        try:
            if check is not None:
                row["agree"] = check()
            timed(row, fn)
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:  # noqa: BLE001 - an unbuilt extension or a kernel bug is a row, not the end
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for mb in GEMM_CHUNK_MB:
        for overlap in (False, True):
            for select in SELECTS:
                options = dict(chunk_bytes=mb * 2**20, overlap=overlap, select_backend=select)
                record(f"gemm:{mb}MB:{'overlap' if overlap else 'serial'}:{select}",
                       lambda: chunked_topk_encode(x, W, b, k, **options),
                       lambda: agreement(*chunked_topk_encode(x, W, b, k, **options), pre))
    cols = chunk_columns(n, f, x.element_size())
    chunk = x @ W[:cols].T
    record(f"gemm:one_chunk_{cols}:addmm", lambda: torch.addmm(b[:cols], x, W[:cols].T, out=chunk))
    for select in SELECTS:
        record(f"gemm:one_chunk_{cols}:select_{select}", lambda: topk_select(chunk, k, backend=select))
    def auxk_agreement(select):
        values, indices = chunked_topk_encode(x, W, b, aux_k, dead, select_backend=select)
        return agreement(values, torch.searchsorted(dead, indices), pre[:, dead])

    for select in SELECTS:
        record(f"auxk{aux_k}:gemm:{select}",
               lambda: chunked_topk_encode(x, W, b, aux_k, dead, select_backend=select),
               lambda: auxk_agreement(select))
    return rows


def breakdown(n: int, f: int, d: int, k: int, backend: str = "triton") -> dict:
    """Per-kernel CUDA time (ms per call) of one encode and one forward + backward step."""
    from torch.profiler import ProfilerActivity, profile

    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device=DEVICE, seed=0)
    x = torch.randn(n, d, device=DEVICE)
    dead = torch.rand(f, device=DEVICE) < 0.1
    dead_list = torch.nonzero(dead).squeeze(1)  # listed ahead, as the trainer does

    def encode():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            sae.encode(x, backend=backend)

    def step():
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x, dead_latents=dead_list, backend=backend, check=False)
        out.loss.backward()

    result = {}
    for name, fn in [("encode", encode), ("fwd_bwd", step)]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = {}
        for evt in prof.key_averages():
            cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if cuda_us:
                table[evt.key[:90]] = round(cuda_us / 5 / 1e3, 4)
        result[name] = dict(sorted(table.items(), key=lambda kv: -kv[1])[:25])
        print(backend, name, json.dumps(result[name], indent=1), flush=True)
    return result


SECTIONS = ("encode", "decode", "auxk", "gemm", "breakdown")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON, rewritten after each shape")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and one small tiling, section gemm by default; runs on CPU too "
                             "(--sections encode there interprets the fused kernel: about a minute)")
    parser.add_argument("--shapes", default=None, help="comma-separated NxF (default 4096x65536,4096x262144)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    args = parser.parse_args(argv)
    if DEVICE.type != "cuda" and not args.smoke:
        print("tune_topk_encode.py needs a CUDA GPU (use --smoke to check the script)", file=sys.stderr)
        return 2
    d, k = (32, 4) if args.smoke else (1024, 32)
    shapes = args.shapes or ("16x512" if args.smoke else "4096x65536,4096x262144")
    sections = set((args.sections or ("gemm" if args.smoke else ",".join(SECTIONS))).split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    report = {"meta": stamp(DEVICE), "complete": False, "sweep": [], "breakdown": {}}
    for shape in shapes.split(","):
        n, f = map(int, shape.split("x"))
        if args.smoke:  # one small tiling: the interpreter takes seconds per program of a large one
            report["sweep"] += sweep(n, f, d, k, sections, [T(16, 32, 32, 4, 1)], aux_k=4 * k)
        else:
            report["sweep"] += sweep(n, f, d, k, sections)
        args.out.write_text(json.dumps(report, indent=1))
    if "breakdown" in sections:
        for backend in ("triton", "cuda"):
            try:
                report["breakdown"][backend] = breakdown(4096, 2**18, d, k, backend)
            except Exception:
                report["breakdown"][backend] = {"error": traceback.format_exc()[-2000:]}
    report["complete"] = True
    args.out.write_text(json.dumps(report, indent=1))
    for row in report["sweep"]:
        print(f"{row['N']:>6} {row['F']:>8} {row['variant']:<40} {row.get('ms', float('nan')):8.3f} ms "
              f"{row.get('over_gemm', float('nan')):6.2f}x  agree={row.get('agree', '')} {row.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
