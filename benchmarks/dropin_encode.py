"""Drop-in encode throughput: a SAELens TopK SAE and a sparsify TopK SparseCoder, each made
and saved by its own library, encoded through saeengine (SAE.from_pretrained) and through
the peer's own library, on the same machine, in the same run, with the same torch threads
and the same inputs.

    python benchmarks/dropin_encode.py [--tokens 4096] [--d-in 768] [--d-sae 16384] [--k 32]
        [--batch 1024] [--threads 1] [--repeats 7] [--rounds 2] [--out benchmarks/results/<date>-cpu-dropin-encode.json]

Run it with this repository's .venv python. The peers run in the fixture venv
(tests/fixtures/_fixture_common.make_venv: /tmp/saeengine-peer-venvs/peers) as subprocesses
(``--peer saelens|sparsify``): each builds a random SAE (seeded), saves it with its own
save function, times its own ``encode`` over the recorded inputs and writes its codes;
then saeengine loads the saved folder and times ``SAE.encode`` over the same inputs, and
checks that its codes are the peer's (same top-k latents; values within 1e-4).

Timed: encode only (inputs already in memory as float32 [batch, d_in]; SAELens returns
dense [batch, F] activations, sparsify and saeengine [batch, k] values + indices), the
median (and the best) of ``repeats`` passes over all tokens after one warm-up pass, over
``rounds`` alternations of the peer's run and saeengine's (a shared machine's load drifts);
tokens/s = tokens / time. CPU (the peers' GPU kernels are not what this measures: sparsify's Triton
decoder is not part of encode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import _fixture_common as fc  # noqa: E402

PACKAGES = ["sae-lens==6.54.12", "eai-sparsify==1.3.3", "datasets"]


def _time(fn, batches, repeats: int) -> list[float]:
    for xb in batches:  # warm-up pass (allocator, thread pool, lazy imports)
        fn(xb)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for xb in batches:
            fn(xb)
        times.append(time.perf_counter() - start)
    return times


# ----- peer side -------------------------------------------------------------------------------
def peer(kind: str, work: Path, a) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = load_file(str(work / "x.safetensors"))["x"]
    batches = list(x.split(a.batch))
    if kind == "saelens":
        from sae_lens import SAE, TopKSAE, TopKSAEConfig

        made = TopKSAE(TopKSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k))
        fc.randomize_(made, 1, scale=0.05)
        made.save_model(work / "saelens")
        sae = SAE.load_from_disk(work / "saelens")

        def encode(xb):
            return sae.encode(xb)

        with torch.no_grad():
            first = sae.encode(batches[0])
            values, indices = first.topk(a.k, dim=1)
        from importlib.metadata import version
        versions = {"sae-lens": version("sae-lens")}
    else:
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder

        made = SparseCoder(a.d_in, SparseCoderConfig(num_latents=a.d_sae, k=a.k))
        fc.randomize_(made, 2, scale=0.05)
        made.save_to_disk(work / "sparsify")
        sae = SparseCoder.load_from_disk(work / "sparsify")

        def encode(xb):
            return sae.encode(xb)

        with torch.no_grad():
            out = sae.encode(batches[0])
            values, indices = out.top_acts, out.top_indices
        from importlib.metadata import version
        versions = {"eai-sparsify": version("eai-sparsify")}
    with torch.no_grad():
        times = _time(encode, batches, a.repeats)
    save_file({"values": values.contiguous(), "indices": indices.contiguous()}, str(work / f"{kind}-codes.safetensors"))
    versions["torch"] = torch.__version__
    print(json.dumps({"times_s": times, "versions": versions, "threads": torch.get_num_threads()}))


# ----- host side (saeengine) -----------------------------------------------------------------------
def ours(kind: str, work: Path, a) -> dict:
    import torch
    from safetensors.torch import load_file

    from saeengine import SAE

    torch.set_num_threads(a.threads)
    x = load_file(str(work / "x.safetensors"))["x"]
    batches = list(x.split(a.batch))
    sae = SAE.from_pretrained(work / kind)
    with torch.no_grad():
        code = sae.encode(batches[0])
        times = _time(lambda xb: sae.encode(xb, check=False), batches, a.repeats)
    ref = load_file(str(work / f"{kind}-codes.safetensors"))
    ours_sorted = code.indices.sort(1).values
    same = bool(torch.equal(ours_sorted, ref["indices"].sort(1).values))
    ref_dense = torch.zeros(batches[0].shape[0], a.d_sae).scatter(1, ref["indices"], ref["values"])
    dv = float((code.to_dense(a.d_sae) - ref_dense).abs().max())
    return {"times_s": times, "same_indices_first_batch": same, "max_abs_value_diff_first_batch": dv,
            "threads": torch.get_num_threads()}




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2, help="alternations of peer and saeengine runs (default: 2)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--peer", choices=["saelens", "sparsify"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peer:
        return peer(a.peer, a.work, a)
    import torch
    from safetensors.torch import save_file

    python = fc.make_venv("peers", PACKAGES)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        g = torch.Generator().manual_seed(0)
        save_file({"x": torch.randn(a.tokens, a.d_in, generator=g)}, str(work / "x.safetensors"))
        args = ["--tokens", str(a.tokens), "--d-in", str(a.d_in), "--d-sae", str(a.d_sae), "--k", str(a.k),
                "--batch", str(a.batch), "--threads", str(a.threads), "--repeats", str(a.repeats)]
        times = {kind: {"peer": [], "ours": []} for kind in ("saelens", "sparsify")}
        for _ in range(a.rounds):  # alternate peer and saeengine: a loaded machine drifts over minutes
            for kind in ("saelens", "sparsify"):
                env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "fixtures"), "CUDA_VISIBLE_DEVICES": ""}
                done = subprocess.run([str(python), __file__, "--peer", kind, "--work", str(work), *args], env=env,
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-4000:])
                theirs = json.loads(done.stdout.strip().splitlines()[-1])
                mine = ours(kind, work, a)
                times[kind]["peer"] += theirs["times_s"]
                times[kind]["ours"] += mine["times_s"]
                results[kind] = {
                    "peer_versions": theirs["versions"], "peer_threads": theirs["threads"],
                    "saeengine_threads": mine["threads"],
                    "same_indices_first_batch": mine["same_indices_first_batch"],
                    "max_abs_value_diff_first_batch": mine["max_abs_value_diff_first_batch"],
                }
        for kind, got in times.items():
            t_peer, t_ours = statistics.median(got["peer"]), statistics.median(got["ours"])
            results[kind].update({
                "peer_tokens_per_s": round(a.tokens / t_peer), "saeengine_tokens_per_s": round(a.tokens / t_ours),
                "speedup_median": round(t_peer / t_ours, 3),
                "peer_tokens_per_s_best": round(a.tokens / min(got["peer"])),
                "saeengine_tokens_per_s_best": round(a.tokens / min(got["ours"])),
                "speedup_best": round(min(got["peer"]) / min(got["ours"]), 3),
                "peer_times_s": got["peer"], "saeengine_times_s": got["ours"]})
            r = results[kind]
            print(f"{kind}: median peer {r['peer_tokens_per_s']} tok/s, saeengine {r['saeengine_tokens_per_s']} "
                  f"tok/s (x{r['speedup_median']}); best {r['peer_tokens_per_s_best']} vs "
                  f"{r['saeengine_tokens_per_s_best']} (x{r['speedup_best']}); same codes: "
                  f"{r['same_indices_first_batch']}")
    from saeengine.validation import run_stamp  # the date, commit, versions and machine
    report = {
        **run_stamp(),
        "settings": {"what": "encode only, float32 inputs in memory, median of repeats after a warm-up pass",
                     "device": "cpu", "tokens": a.tokens, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k,
                     "batch": a.batch, "torch_threads": a.threads, "repeats": a.repeats, "rounds": a.rounds,
                     "load_average_at_end": os.getloadavg()},
        "results": results,
    }
    out = a.out or REPO / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-cpu-dropin-encode.json"
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
