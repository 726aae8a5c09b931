"""Communication and memory per step of the distributed layouts, and CPU step times on gloo.

Three parts, all written to benchmarks/results/<date>-distributed-comm.json:

1. Counted bytes: a real forward + backward on gloo processes at the issue's token shape
   (N = 16384 tokens per latent group, d = 1024, k = 32; a small F per rank, since the
   latent axis's traffic does not depend on F) with saeengine.distributed.comm counting
   every collective; DDP's gradient all-reduce counted on a small F (it is 4 (2Fd + F + d)
   bytes whatever F: the counted and closed-form numbers are printed side by side) and
   extrapolated to F = 2^20 by that formula.
2. Arithmetic (closed forms of saeengine.distributed.comm): latent axis vs DDP for d = 1024,
   F = 2^20, N = 16384, k = 32 (and with AuxK, k_aux = 512); for F = 2^24 on 8 GPUs of
   80 GB: the memory per rank of each layout (weights, Adam, gradients, activations) and
   the widest power-of-two F each fits.
3. CPU step times (gloo, one torch thread per process): forward + backward at the same
   global batch, 1 process vs 2 and 4 (latent axis, data axis, 2 x 2), median of repeats.
   On a shared 2-core machine 4 processes oversubscribe the cores: the record, not a
   speedup claim.

Run: ``.venv/bin/python benchmarks/distributed_comm.py`` (about 2 minutes on 2 cores;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saeengine import SAE, SAEConfig  # noqa: E402
from saeengine.distributed import _spawn, comm  # noqa: E402




# ----- 1. counted -----------------------------------------------------------------------------

def _count_worker(rank, world, data, latent, n, d, k, f, k_aux):
    from saeengine.distributed import LatentShardedSAE, MeshSpec, allreduce_data_grads_, counting, init_mesh

    mesh = init_mesh(MeshSpec(data, latent))
    cfg = SAEConfig(d_in=d, d_sae=f, k=k, k_aux=k_aux or None)
    sae = LatentShardedSAE(cfg, mesh, seed=0)
    x = torch.randn(n // data, d, generator=torch.Generator().manual_seed(mesh.data_rank))
    dead = None
    if k_aux:
        dead = torch.zeros(sae.d_slice, dtype=torch.bool)
        dead[::2] = True
    with counting() as log:
        out = sae(x, dead, check=False)
        out.loss.backward()
        allreduce_data_grads_(sae)
    return {"by_label": log.by_label(), "latent_bytes": log.total(axis="latent"), "data_bytes": log.total(axis="data"),
            "latent_wire_bytes": log.total(axis="latent", wire=True),
            "data_wire_bytes": log.total(axis="data", wire=True)}


def counted(quick: bool) -> dict:
    n, d, k = (2048, 256, 32) if quick else (16384, 1024, 32)
    out = {"shape": {"tokens_per_latent_group": n, "d": d, "k": k}}
    for p in (2, 4):
        f = 64 * p  # F does not enter the latent axis's traffic
        got = _spawn.run(_count_worker, p, 1, p, n, d, k, f, 0, timeout=600)[0]
        f_aux = 2048 if not quick else 256  # half dead: S = F / 2 >= k_aux, the full AuxK width
        aux = _spawn.run(_count_worker, p, 1, p, n, d, k, f_aux, 512 if not quick else 64, timeout=600)[0]
        closed = comm.latent_axis_bytes(n, d, k, p)
        closed_aux = comm.latent_axis_bytes(n, d, k, p, k_aux=512 if not quick else 64)
        out[f"latent_{p}"] = {"F_counted": f, "F_counted_auxk": f_aux, "counted": got, "closed_form": closed,
                              "counted_auxk": aux, "closed_form_auxk": closed_aux}
        print(f"latent axis P={p}: counted {got['latent_bytes'] / 1e6:.1f} MB payload per rank per step "
              f"(closed form {closed['total'] / 1e6:.1f} MB); with AuxK {aux['latent_bytes'] / 1e6:.1f} MB "
              f"({closed_aux['total'] / 1e6:.1f} MB)")
    f_small = 4096
    ddp = _spawn.run(_count_worker, 2, 2, 1, 2 * 64, d, k, f_small, 0, timeout=600)[0]
    grads = ddp["by_label"]["data:all_reduce:grads"]
    out["ddp_2"] = {"F_counted": f_small, "counted_grad_bytes": grads, "closed_form": comm.ddp_bytes(f_small, d),
                    "F_2^20_closed_form": comm.ddp_bytes(2**20, d)}
    print(f"DDP (data axis only): counted {grads / 1e6:.2f} MB at F={f_small} (closed form "
          f"{comm.ddp_bytes(f_small, d) / 1e6:.2f} MB) -> {comm.ddp_bytes(2**20, d) / 1e9:.2f} GB at F=2^20")
    return out


# ----- 2. arithmetic ----------------------------------------------------------------------------

def arithmetic() -> dict:
    d, n, k, f = 1024, 16384, 32, 2**20
    rows = {}
    for p in (2, 4, 8):
        for k_aux in (0, 512):
            b = comm.latent_axis_bytes(n, d, k, p, k_aux=k_aux)
            rows[f"latent_P{p}_kaux{k_aux}"] = {**b, "wire_total": _wire(b, p)}
    ddp = comm.ddp_bytes(f, d)
    rows["ddp"] = {"total": ddp, "wire_total_ring": int(2 * 7 / 8 * ddp)}
    print(f"F=2^20: latent axis P=8 {rows['latent_P8_kaux0']['total'] / 1e6:.1f} MB "
          f"({rows['latent_P8_kaux512']['total'] / 1e6:.1f} MB with AuxK 512) vs DDP {ddp / 1e9:.2f} GB "
          "per rank per step")
    # F = 2^24 on 8 GPUs of 80 GB, global batch 16384 tokens.
    layouts = {"ddp_data8": (8, 1), "latent8": (1, 8), "data2_latent4": (2, 4), "data4_latent2": (4, 2)}
    big = {}
    for name, (data, latent) in layouts.items():
        n_rank = n // data
        mem = comm.memory_per_rank(2**24, d, n_rank, k, latent=latent, data=data, k_aux=512)
        widest = comm.widest_fitting(80e9, d, n_rank, k, latent=latent, data=data, k_aux=512)
        traffic = {"latent_axis": comm.latent_axis_bytes(n_rank, d, k, latent, k_aux=512)["total"],
                   "data_axis_dense_grads": comm.ddp_bytes(-(-2**24 // latent), d) if data > 1 else 0}
        big[name] = {"data": data, "latent": latent, "tokens_per_rank": n_rank,
                     "memory_per_rank_F2^24_GB": {key: round(v / 1e9, 3) for key, v in mem.items()},
                     "fits_80GB_at_F2^24": mem["total"] <= 0.9 * 80e9,
                     "widest_F_power_of_two_in_90pct_of_80GB": widest, "widest_log2": widest.bit_length() - 1,
                     "bytes_per_step_F2^24": traffic}
        print(f"F=2^24 {name}: {mem['total'] / 1e9:.1f} GB per rank (fits: {mem['total'] <= 0.9 * 80e9}); widest "
              f"2^{widest.bit_length() - 1}")
    return {"F2^20": rows, "F2^24_8x80GB": big,
            "model": "fp32 weights 2F_r d + F_r + d; Adam 2 moments; fp32 grads; activations 5 N d fp32 + codes + "
                     "gathered keys; the fused encoder holds no [N, F] (saeengine.distributed.comm.memory_per_rank)"}


def _wire(b: dict, p: int) -> int:
    return int((p - 1) * b["topk_candidates"] + 2 * (p - 1) / p * (b["partial_recon"] + b["backward"]))


# ----- 3. CPU step times ------------------------------------------------------------------------

def _time_worker(rank, world, data, latent, n, d, k, f, repeats):
    from saeengine.distributed import LatentShardedSAE, Mesh, MeshSpec, allreduce_data_grads_, init_mesh

    mesh = init_mesh(MeshSpec(data, latent)) if world > 1 else Mesh.single()
    sae = LatentShardedSAE.from_sae(SAE(SAEConfig(d_in=d, d_sae=f, k=k), seed=0), mesh)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    rows = x.chunk(data)[mesh.data_rank]
    times = []
    for i in range(repeats + 1):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        sae.zero_grad(set_to_none=True)
        out = sae(rows, check=False)
        out.loss.backward()
        allreduce_data_grads_(sae)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _time_single_sae(n, d, k, f, repeats):
    torch.set_num_threads(1)
    sae = SAE(SAEConfig(d_in=d, d_sae=f, k=k), seed=0)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sae.zero_grad(set_to_none=True)
        sae(x, check=False).loss.backward()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def step_times(quick: bool) -> dict:
    n, d, k, f = (512, 64, 16, 2048) if quick else (2048, 256, 32, 16384)
    repeats = 3 if quick else 7
    out = {"shape": {"global_tokens": n, "d": d, "k": k, "F": f, "repeats": repeats, "torch_threads_per_process": 1}}
    single = _time_single_sae(n, d, k, f, repeats)
    out["1_process_SAE"] = {"median_s": statistics.median(single), "times_s": single}
    for name, (data, latent) in {"1x1_sharded_code": (1, 1), "latent_1x2": (1, 2), "data_2x1": (2, 1),
                                 "latent_1x4": (1, 4), "mesh_2x2": (2, 2)}.items():
        world = data * latent
        if world == 1:
            got = [_time_worker(0, 1, 1, 1, n, d, k, f, repeats)]
        else:
            got = _spawn.run(_time_worker, world, data, latent, n, d, k, f, repeats, timeout=600)
        per_step = [max(ts) for ts in zip(*got)]  # a step ends when its slowest rank does
        out[name] = {"processes": world, "median_s": statistics.median(per_step), "times_s": per_step,
                     "vs_1_process": statistics.median(per_step) / statistics.median(single)}
        print(f"CPU gloo {name} ({world} processes): {statistics.median(per_step) * 1e3:.1f} ms per forward+backward "
              f"(1 process {statistics.median(single) * 1e3:.1f} ms)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from saeengine.validation import run_stamp  # the date, commit, versions and machine
    report = {
        **run_stamp(),
        "settings": {"backend": "gloo (CPU)", "quick": a.quick,
                     "what": "payload bytes = the tensor each rank hands to a collective; wire = ring estimate"},
        "counted": counted(a.quick),
        "arithmetic": arithmetic(),
        "cpu_step_times": step_times(a.quick),
    }
    report["settings"]["load_average_at_end"] = os.getloadavg()
    out = a.out or REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-distributed-comm.json"
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
