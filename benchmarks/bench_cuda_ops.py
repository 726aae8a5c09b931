"""The csrc/ ops against their baselines, on one GPU in one run (issue 4's figures).

    python benchmarks/bench_cuda_ops.py --out benchmarks/results/<date>-<gpu>-cuda-ops.json
    python benchmarks/bench_cuda_ops.py --smoke        # tiny shapes, any device (checks the script)

Each time is a median with its [20th, 50th, 80th] percentiles beside it (``<key>_q``); the
JSON, stamped with the commit, is rewritten after every section.

Sections (--sections, comma-separated; all by default):
  select     topk_select (cuda) against torch.topk, N=4096, F=2^18, k=32, fp32 and bf16
  decode     sparse decode forward and backward, cuda against triton; forward GB/s of the
             gathered bytes (N*k*d*bytes) as a fraction of the measured copy bandwidth
  optimizer  row-sparse Adam (cuda, the rows of one step; dense and sparse weight gradients)
             against dense fused torch Adam, F=2^20
  resample   one resampling call with 10% of F=2^20 dead
  step       a full training step at N=4096, F=2^20: encoder, sparse backward and
             row-sparse Adam, with sparse weight gradients (and once with dense ones),
             against sparsify's forward+backward and fused Adam
  widest     one full step at N=16384 for F = 2^20, 2^21, 2^22 with sparse weight
             gradients: fp32 moments, bf16 moments, and bf16 moments with no bf16 weight
             copies; time and peak GB, or OOM, beside the bytes the shapes imply
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import saeengine
from run_benchmarks import (copy_bandwidth_gbps, guarded, host_syncs, implementations_here, measure_into,
                            sparsify_coder, stamp)
from saeengine import SAE, SAEConfig, ops
from saeengine.optim import RowSparseAdam, resample_dead_latents_
from saeengine.trainer import TrainStep

SECTIONS = ("select", "decode", "optimizer", "resample", "step", "widest")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def select_rows(n: int, f: int, k: int, device: torch.device) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, f, device=device).to(dtype)
        row = {"N": n, "F": f, "k": k, "dtype": _dtype_name(dtype)}
        for backend in implementations_here("topk_select", device):
            measure_into(row, f"{backend}_ms", lambda: ops.topk_select(x, k, backend=backend), device)
        if isinstance(row.get("cuda_ms"), float) and isinstance(row.get("torch_ms"), float):
            row["speedup_vs_torch"] = row["torch_ms"] / row["cuda_ms"]
        rows.append(row)
    return rows


def decode_rows(n: int, f: int, d: int, k: int, device: torch.device, copy_gbps: float | None) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        values = torch.rand(n, k, device=device, dtype=dtype, requires_grad=True)
        indices = torch.randint(0, f, (n, k), device=device)
        W = torch.randn(f, d, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(n, d, device=device, dtype=dtype)
        row = {"N": n, "F": f, "d": d, "k": k, "dtype": _dtype_name(dtype)}
        gathered = n * k * d * W.element_size()
        for backend in implementations_here("sparse_decode", device):
            def forward():
                with torch.no_grad():
                    ops.sparse_decode(values, indices, W, backend=backend, check=False)

            def backward():
                out = ops.sparse_decode(values, indices, W, backend=backend, check=False)
                torch.autograd.grad(out, (values, W), grad_out)

            measure_into(row, f"fwd_{backend}_ms", forward, device)
            ms = row[f"fwd_{backend}_ms"]
            if isinstance(ms, float):
                row[f"fwd_{backend}_gbps"] = gathered / ms / 1e6
                if copy_gbps:
                    row[f"fwd_{backend}_of_copy_bw"] = row[f"fwd_{backend}_gbps"] / copy_gbps
            measure_into(row, f"fwd_bwd_{backend}_ms", backward, device)
        rows.append(row)
    return rows


def _step_rows(n: int, f: int, k: int, device: torch.device) -> torch.Tensor:
    """The distinct latents one step of n tokens touches (random codes: the most rows)."""
    return torch.unique(torch.randint(0, f, (n * k,), device=device))


def optimizer_rows(n: int, f: int, d: int, k: int, device: torch.device) -> list[dict]:
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), device=device, seed=0)
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    rows = _step_rows(n, f, k, device)
    row = {"N": n, "F": f, "d": d, "rows": int(rows.numel())}
    for backend in implementations_here("row_sparse_adam", device):
        measure_into(row, f"row_sparse_{backend}_ms",
                     lambda opt=RowSparseAdam(sae, lr=1e-4, backend=backend): opt.step(rows), device)
    dense = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type == "cuda")
    measure_into(row, "dense_adam_ms", dense.step, device)
    del dense
    # The same step reading sparse weight gradients (the rows only, as the trainer gives them).
    for W in (sae.W_enc, sae.W_dec):
        W.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), W.grad[rows], W.shape, check_invariants=False).coalesce()
    for backend in implementations_here("row_sparse_adam", device):
        measure_into(row, f"row_sparse_{backend}_sparse_grad_ms",
                     lambda opt=RowSparseAdam(sae, lr=1e-4, backend=backend): opt.step(rows), device)
    return [row]


def resample_rows(f: int, d: int, device: torch.device) -> list[dict]:
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=32), device=device, seed=0)
    opt = RowSparseAdam(sae, lr=1e-4, backend="torch")
    dead = torch.rand(f, device=device) < 0.1
    x, losses = torch.randn(4096, d, device=device), torch.rand(4096, device=device)
    row = {"F": f, "d": d, "dead": int(dead.sum())}
    for backend in implementations_here("resample_dead", device):
        measure_into(row, f"{backend}_ms", lambda: resample_dead_latents_(sae, opt, dead, x, losses, backend=backend),
                     device)
    return [row]


def full_step(sae: SAE, opt, x: torch.Tensor, dead: torch.Tensor, weight_copies: bool = True):
    """The trainer's step (saeengine.trainer.TrainStep) on ``x``: forward (bf16 autocast on
    CUDA, AuxK over the latents of ``dead`` [F] bool), backward, and ``opt``'s step on the
    rows that fired, with sparse weight gradients unless ``opt.sparse_grad`` is False; the
    kernels read bf16 copies of the weights unless ``weight_copies`` is False. No clipping
    (as in the rows recorded before; sparsify's step does not clip either), no resampling,
    the peak learning rate throughout. The dead latents stay dead for the whole
    measurement: they never fired, and their encoder rows are shrunk 1000x so that they
    never win the main top-k (AuxK still trains them)."""
    n = x.shape[0]
    cfg = saeengine.TrainConfig(d_sae=sae.cfg.d_sae, k=sae.cfg.k, batch_size=n, total_tokens=n * 2**40, lr=1e-4,
                                warmup_steps=0, clip_grad_norm=0.0, autocast="bfloat16", dead_after_tokens=2**62)
    with torch.no_grad():
        sae.W_enc[dead] *= 1e-3
    step = TrainStep(sae, cfg, opt, forward_options={"weight_copies": weight_copies})
    step.last_fired.masked_fill_(dead, -2**62)
    return lambda: step(x)


def memory_model_gb(f: int, d: int, moment_bytes: int, grad_rows: int, weight_copies: bool = True) -> dict:
    """Bytes the step must hold by construction (arithmetic from the shapes, not a
    measurement): fp32 W_enc and W_dec, fp32 gradients of ``grad_rows`` rows each (F when
    dense), two Adam moments each, and the bf16 compute copies (when made)."""
    weights = 2 * f * d
    return {"params_gb": weights * 4 / 1e9, "grads_gb": 2 * grad_rows * d * 4 / 1e9,
            "moments_gb": 2 * weights * moment_bytes / 1e9,
            "bf16_copies_gb": weights * 2 / 1e9 if weight_copies else 0.0}


def measure_our_step(row: dict, x: torch.Tensor, f: int, k: int, dead: torch.Tensor,
                     moment_dtype: torch.dtype = torch.float32, sparse_grad: bool = True,
                     weight_copies: bool = True) -> None:
    """row["step_ms"], row["peak_gb"] of saeengine's full step, or "OOM" (the SAE too)."""
    row.update(moment_dtype=_dtype_name(moment_dtype), sparse_grad=sparse_grad, weight_copies=weight_copies)
    # Sparse gradients hold the rows the codes chose: at most N*k main rows plus the dead ones.
    grad_rows = min(f, x.shape[0] * k + int(dead.sum())) if sparse_grad else f
    row.update(memory_model_gb(f, x.shape[1], torch.finfo(moment_dtype).bits // 8, grad_rows, weight_copies))
    try:
        sae = SAE(SAEConfig(d_in=x.shape[1], d_sae=f, k=k), device=x.device, seed=0)
        # The CUDA optimizer by name: "auto" passes over kernels awaiting their GPU validation.
        backend = "cuda" if "cuda" in saeengine.available_backends("row_sparse_adam", x.device) else "torch"
        opt = RowSparseAdam(sae, lr=1e-4, moment_dtype=moment_dtype, backend=backend, sparse_grad=sparse_grad)
        row["optimizer_backend"] = backend
    except torch.OutOfMemoryError:
        row["step_ms"] = "OOM"
        return
    step = full_step(sae, opt, x, dead, weight_copies)
    measure_into(row, "step_ms", step, x.device, "peak_gb", sae)
    if isinstance(row["step_ms"], float):
        row["host_syncs"] = host_syncs(step)


def step_rows(n: int, f: int, d: int, k: int, device: torch.device) -> list[dict]:
    x = torch.randn(n, d, device=device)
    dead = torch.rand(f, device=device) < 0.1
    row = {"N": n, "F": f, "d": d, "k": k}
    dense = {}
    measure_our_step(dense, x, f, k, dead, sparse_grad=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row.update(step_dense_grad_ms=dense.get("step_ms"), peak_dense_grad_gb=dense.get("peak_gb"))
    measure_our_step(row, x, f, k, dead)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    coder = sparsify_coder(d, f, k, device)
    if coder is not None:
        adam = torch.optim.Adam(coder.parameters(), lr=1e-4, fused=device.type == "cuda")

        def sparsify_step():
            coder.zero_grad(set_to_none=True)
            out = coder(x, dead_mask=dead)
            (out.fvu + out.auxk_loss / 32).backward()
            adam.step()
        measure_into(row, "sparsify_step_ms", sparsify_step, device, "sparsify_peak_gb", coder)
        row["sparsify_host_syncs"] = host_syncs(sparsify_step)
        if isinstance(row.get("step_ms"), float) and isinstance(row.get("sparsify_step_ms"), float):
            row["speedup_vs_sparsify"] = row["sparsify_step_ms"] / row["step_ms"]
    return [row]


def widest_rows(n: int, widths: list[int], d: int, k: int, device: torch.device) -> list[dict]:
    rows = []
    x = torch.randn(n, d, device=device)
    for f in widths:  # fp32 moments, bf16 moments, and bf16 moments without weight copies
        for moment_dtype, copies in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)):
            rows.append({"N": n, "F": f})
            measure_our_step(rows[-1], x, f, k, torch.rand(f, device=device) < 0.1, moment_dtype,
                             weight_copies=copies)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (any device); written only with --out")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON here, after every section (with --smoke too)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("bench_cuda_ops.py: no GPU visible; use --smoke to check the script", file=sys.stderr)
        return 2
    n, d, k, f_small, f_large = (64, 32, 4, 512, 1024) if args.smoke else (4096, 1024, 32, 2**18, 2**20)
    big_n, widths = (128, [1024, 2048]) if args.smoke else (16384, [2**20, 2**21, 2**22])
    copy_gbps = copy_bandwidth_gbps(device)
    plan = {
        "select": lambda: select_rows(n, f_small, k, device),
        "decode": lambda: decode_rows(n, f_small, d, k, device, copy_gbps),
        "optimizer": lambda: optimizer_rows(n, f_large, d, k, device),
        "resample": lambda: resample_rows(f_large, d, device),
        "step": lambda: step_rows(n, f_large, d, k, device),
        "widest": lambda: widest_rows(big_n, widths, d, k, device),
    }
    results = {"meta": {**stamp(device), "copy_gbps": copy_gbps}, "complete": False}
    sections = args.sections.split(",")
    for section in sections:
        if section not in plan:
            parser.error(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
    for section in sections:
        out = guarded(lambda _n, _f: plan[section](), 0, 0)
        results[section] = out if isinstance(out, list) else [out]
        for row in results[section]:
            print(section, json.dumps(row), flush=True)
        results["complete"] = section == sections[-1]
        if args.out:  # after every section: a stopped run keeps what it measured
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
