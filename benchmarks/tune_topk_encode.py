"""Tile-shape and method sweep for the fused top-k encoder, plus a per-kernel breakdown.

    python benchmarks/tune_topk_encode.py --out tune.json      # needs a GPU

For each (N, F) at d=1024, k=32, bf16:
- the cuBLAS GEMM x W^T alone;
- every tiling in TILINGS: both selection methods, and the tilemerge kernel with selection
  switched off, which times the Triton GEMM + epilogue alone;
- the chunked GEMM + top-k select encoder (backend "cuda") per chunk size, overlap and
  per-chunk select;
- forward + backward with the AuxK code through dense GEMMs against the sparse kernels.
Each variant's top-k is checked against torch.topk on the same bf16 pre-activations (the
fraction of rows whose index sets match, ties aside) before it is timed. Then a
torch.profiler breakdown of one encode and of one forward + backward step (AuxK, 10%
dead) for the triton and cuda backends.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import error_text, stamp  # noqa: E402

import saeengine  # noqa: E402
from saeengine import SAE, SAEConfig  # noqa: E402
from saeengine.ops import topk_encode_ref, topk_select  # noqa: E402
from saeengine.ops.gemm_topk import chunk_columns, gemm_topk_encode  # noqa: E402
from saeengine.kernels.sparse_decode import sparse_decode_forward  # noqa: E402
from saeengine.kernels.topk_encode import EncodeTiling, topk_encode_forward  # noqa: E402

T = EncodeTiling
TILINGS = [
    T(64, 128, 64, 4, 3, "filter"),
    T(64, 128, 64, 4, 4, "filter"),
    T(64, 128, 64, 4, 2, "filter"),
    T(64, 128, 128, 4, 3, "filter"),
    T(64, 128, 32, 4, 4, "filter"),
    T(64, 64, 64, 4, 4, "filter"),
    T(64, 256, 64, 4, 3, "filter"),
    T(128, 128, 64, 4, 3, "filter"),
    T(64, 128, 64, 4, 3, "tilemerge"),
]
GEMM_ONLY = [T(64, 128, 64, 4, 3, "tilemerge"), T(128, 256, 64, 8, 3, "tilemerge")]
DECODE_OPTIONS = [dict(unroll=8, block_d=1024, num_warps=4), dict(unroll=4, block_d=1024, num_warps=4),
                  dict(unroll=16, block_d=1024, num_warps=4), dict(unroll=8, block_d=512, num_warps=2),
                  dict(unroll=8, block_d=1024, num_warps=8)]


def ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def agreement(values, indices, pre) -> float:
    """Fraction of rows whose chosen set equals torch.topk's, or whose k-th value ties."""
    ref_v, ref_i = pre.topk(values.shape[1], dim=1)
    same = (indices.sort(1).values == ref_i.sort(1).values).all(1)
    tie = (values[:, -1].float() - ref_v[:, -1].float()).abs() <= 1e-2 * ref_v[:, -1].float().abs().clamp_min(1e-3)
    return float((same | tie).float().mean())


def sweep(n: int, f: int, d: int, k: int, sections: set[str]) -> list[dict]:
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(f, d, device="cuda") / d**0.5).to(torch.bfloat16)
    b = (0.01 * torch.randn(f, device="cuda")).to(torch.bfloat16)
    gemm = ms(lambda: x @ W.T)
    pre = torch.relu(x @ W.T + b)
    rows = [{"N": n, "F": f, "variant": "cublas_gemm", "ms": gemm, "over_gemm": 1.0}]
    variants = [(t, True) for t in TILINGS] + [(t, False) for t in GEMM_ONLY] if "encode" in sections else []
    for tiling, select in variants:
        row = {"N": n, "F": f, "variant": ("" if select else "gemm_only:") + "/".join(map(str, tiling))}
        try:
            if select:
                v, i = topk_encode_forward(x, W, b, k, tiling=tiling)
                row["agree"] = agreement(v, i, pre)
            row["ms"] = ms(lambda: topk_encode_forward(x, W, b, k, tiling=tiling, select=select))
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:  # a tiling may not compile (shared memory, registers)
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # sparse decode (k = 32 and the AuxK width 512) against the CUDA kernel when built
    for kk in (k, 512) if "decode" in sections else ():
        values = torch.rand(n, kk, device="cuda", dtype=torch.bfloat16)
        indices = torch.randint(0, f, (n, kk), device="cuda")
        cuda_op = getattr(torch.ops.saeengine, "sparse_decode", None) if saeengine._native.load_extension()[0] else None
        if cuda_op is not None:
            row = {"N": n, "F": f, "variant": f"decode_k{kk}:cuda", "ms": ms(lambda: cuda_op(values, indices, W, None))}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for options in DECODE_OPTIONS:
            row = {"N": n, "F": f, "variant": f"decode_k{kk}:" + "/".join(str(v) for v in options.values())}
            row["ms"] = ms(lambda: sparse_decode_forward(values, indices, W, **options))
            row["gbps"] = n * kk * d * 2 / row["ms"] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    # AuxK pass: k_aux = 512 over the 10% dead latents
    dead = torch.nonzero(torch.rand(f, device="cuda") < 0.1).squeeze(1)
    if "auxk" in sections:  # the dense selection the ops layer uses for wide subset codes
        row = {"N": n, "F": f, "variant": "auxk512:dense_gemm+torch.topk"}
        row["ms"] = ms(lambda: topk_encode_ref(x, W, b, 512, latent_subset=dead))
        row["over_gemm"] = row["ms"] / gemm
        rows.append(row)
        print(json.dumps(row), flush=True)
    aux_tilings = [T(), T(64, 64, 64, 4, 3)]
    for tiling in aux_tilings if "auxk" in sections else ():
        row = {"N": n, "F": f, "variant": "auxk512:" + "/".join(map(str, tiling))}
        try:
            v, i = topk_encode_forward(x, W, b, 512, latent_subset=dead, tiling=tiling)
            row["agree"] = agreement(v, torch.searchsorted(dead, i), pre[:, dead])
            row["ms"] = ms(lambda: topk_encode_forward(x, W, b, 512, latent_subset=dead, tiling=tiling))
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "gemm" in sections:
        rows += gemm_variants(n, f, k, x, W, b, dead, pre, gemm)
    if "auxk" in sections:
        rows += auxk_step_variants(n, f, d, k)
    return rows


def auxk_step_variants(n, f, d, k) -> list[dict]:
    """Forward + backward (10% dead, bf16 autocast) with the AuxK code through dense GEMMs
    over the dead latents against the sparse kernels, per encoder backend."""
    from saeengine.ops import dense_auxk

    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device="cuda", seed=0)
    x = torch.randn(n, d, device="cuda")
    dead = torch.rand(f, device="cuda") < 0.1
    dead_list = torch.nonzero(dead).squeeze(1)  # listed ahead, as the trainer does
    rows, default_ratio = [], dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K
    for backend in ("triton", "cuda"):
        for label, ratio in (("dense", 10**9), ("sparse", 0)):
            def step():
                sae.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = sae(x, dead_latents=dead_list, backend=backend, check=False)
                out.loss.backward()
            row = {"N": n, "F": f, "variant": f"fwd_bwd:{backend}:auxk_{label}"}
            dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K = ratio
            try:
                row["ms"] = ms(step)
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                row["error"] = error_text(exc)
            finally:
                dense_auxk.DENSE_AUXK_MAX_SUBSET_PER_K = default_ratio
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


GEMM_CHUNK_MB = (64, 256, 1024)


def gemm_variants(n, f, k, x, W, b, dead, pre, gemm) -> list[dict]:
    """The chunked cuBLAS GEMM + top-k select encoder (backend "cuda"): chunk sizes, the
    side-stream overlap, CUDA against torch.topk per chunk; one chunk's GEMM and select
    alone; and the AuxK code (k=512 over the dead latents) through it."""
    rows = []

    def record(variant, fn, check=None):
        row = {"N": n, "F": f, "variant": variant}
        try:
            if check is not None:
                row["agree"] = check()
            row["ms"] = ms(fn)
            row["over_gemm"] = row["ms"] / gemm
        except Exception as exc:  # noqa: BLE001 - an unbuilt extension or a kernel bug is a row, not the end
            row["error"] = error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for mb in GEMM_CHUNK_MB:
        for overlap in (False, True):
            for select in ("cuda", "torch"):
                options = dict(chunk_bytes=mb * 2**20, overlap=overlap, select_backend=select)
                record(f"gemm:{mb}MB:{'overlap' if overlap else 'serial'}:{select}",
                       lambda: gemm_topk_encode(x, W, b, k, **options),
                       lambda: agreement(*gemm_topk_encode(x, W, b, k, **options), pre))
    cols = chunk_columns(n, f, x.element_size())
    chunk = x @ W[:cols].T
    record(f"gemm:one_chunk_{cols}:addmm", lambda: torch.addmm(b[:cols], x, W[:cols].T, out=chunk))
    for select in ("cuda", "torch"):
        record(f"gemm:one_chunk_{cols}:select_{select}", lambda: topk_select(chunk, k, backend=select))
    def auxk_agreement(select):
        values, indices = gemm_topk_encode(x, W, b, 512, dead, select_backend=select)
        return agreement(values, torch.searchsorted(dead, indices), pre[:, dead])

    for select in ("cuda", "torch"):
        record(f"auxk512:gemm:{select}", lambda: gemm_topk_encode(x, W, b, 512, dead, select_backend=select),
               lambda: auxk_agreement(select))
    return rows


def breakdown(n: int, f: int, d: int, k: int, backend: str = "triton") -> dict:
    """Per-kernel CUDA time (ms per call) of one encode and one forward + backward step."""
    from torch.profiler import ProfilerActivity, profile

    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device="cuda", seed=0)
    x = torch.randn(n, d, device="cuda")
    dead = torch.rand(f, device="cuda") < 0.1
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="4096x65536,4096x262144", help="comma-separated NxF")
    parser.add_argument("--sections", default="encode,decode,auxk,gemm,breakdown",
                        help="comma-separated subset of encode,decode,auxk,gemm,breakdown")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_topk_encode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    d, k = 1024, 32
    report = {"meta": stamp(torch.device("cuda")), "sweep": [], "breakdown": {}}
    sections = set(args.sections.split(","))
    for shape in args.shapes.split(","):
        n, f = map(int, shape.split("x"))
        report["sweep"] += sweep(n, f, d, k, sections)
        args.out.write_text(json.dumps(report, indent=1))
    if "breakdown" in sections:
        for backend in ("triton", "cuda"):
            try:
                report["breakdown"][backend] = breakdown(4096, 2**18, d, k, backend)
            except Exception:
                report["breakdown"][backend] = {"error": traceback.format_exc()[-2000:]}
    args.out.write_text(json.dumps(report, indent=1))
    for row in report["sweep"]:
        print(f"{row['N']:>6} {row['F']:>8} {row['variant']:<40} {row.get('ms', float('nan')):8.3f} ms "
              f"{row.get('over_gemm', float('nan')):6.2f}x  agree={row.get('agree', '')} {row.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
