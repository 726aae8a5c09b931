"""``saeengine encode`` over several ranks: one encode output, byte for byte the single-process one.

``encode_distributed`` runs :func:`saeengine.eval.encode.encode_store`'s pass on every rank
of a torch.distributed world, each on its own rows of the store:

1. every rank opens the store and the SAE and checks them; one ``all_gather_object``
   compares the SAE's checksum, the store's content hash, the settings and out_dir (a
   ConfigError names each differing field and the ranks);
2. the single-process pass's batches (whole images, cut from row 0 by its own rule,
   ``OrderedBatches.stop_of``) are split into contiguous runs, one per rank, of about
   N / W rows each; rank r runs the unchanged pass (``_Pass``: encode, decode, the three
   accumulators, the code files, a commit every minute) over its run into
   ``<out>.parts/rank-<r>-of-<W>/``, ending with a final commit (resume.safetensors: the
   exact states and counts). Beside it, every batch's terms of the metrics' float64 sums
   (a fresh accumulator with the single pass's shift, fed that batch alone) are appended
   to metric_terms.bin before each commit;
3. after an ``all_gather_object`` of every rank's outcome (the last collective: the other
   ranks return None, so none waits in a collective while rank 0 merges), rank 0 merges
   into ``out``: the
   code rows copied from the parts batch by batch (CSR offsets shifted), the latent
   statistics' float64 sums replayed from those codes as LatentStats adds them, the
   metrics' terms added in the single pass's order, the integer counts and histograms
   added, maxima and minima taken, the exemplar tables merged by the pass's own exact
   (score, image) ranking; then the single pass's own ``_commit`` / ``_finish`` write
   latent_stats, exemplars and summary.json (last).

Every float64 sum is thus formed by the single pass's additions in its order, and the
output equals the single-process output byte for byte (on the same device type, backend
and torch thread count, as encode_store's own resume promises).

Crash safety: the parts commit as the single pass does (a rerun continues each from its
last commit; metric terms past the commit are dropped); ``out`` gets summary.json last, so
a merge killed at any point leaves a folder the reader refuses (unfinished), and the rerun
merges again from the parts, which the merge never changes. The parts are removed once
summary.json is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from .._lock import exclusive_lock
from ..errors import InputError, StoreError
from ..eval import encode as enc
from ..eval.encode import _Pass
from . import comm
from .mesh import Mesh, MeshSpec, check_same_config
from .record import check_parts_folder, claim_parts, named_out_dir, part_dir, parts_dir, rank_world, remove_parts

KIND = "encode"  # the parts folder's marker (record.claim_parts)

__all__ = ["batch_starts", "encode_distributed", "merge_parts", "part_dir", "parts_dir", "row_ranges",
           "run_encode_distributed"]


def batch_starts(store, batch_tokens: int) -> list[int]:
    """The first row of every batch of the single-process pass, then N: its batches are
    rows [starts[i], starts[i + 1])."""
    from ..eval.encode_batches import OrderedBatches

    batches = OrderedBatches(store, batch_tokens, 0, -1)
    starts = [0]
    while starts[-1] < store.n_tokens:
        starts.append(batches.stop_of(starts[-1]))
    return starts


def row_ranges(starts: list[int], world: int) -> list[tuple[int, int]]:
    """Rank r's rows [a, b): contiguous runs of whole batches, each ending at the first
    batch boundary at or past (r + 1) N / W (empty ranges when batches are fewer than ranks)."""
    n = starts[-1]
    bounds = np.asarray(starts)
    cuts = [0]
    for r in range(1, world):
        at = int(bounds[np.searchsorted(bounds, -(-r * n // world))])
        cuts.append(max(at, cuts[-1]))
    cuts.append(n)
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


class _StoreRows:
    """The store, seen by the pass as if it ended at row ``stop``."""

    def __init__(self, store, stop: int):
        self._store, self.n_tokens = store, stop

    def __len__(self) -> int:
        return self.n_tokens

    def __getattr__(self, name):
        return getattr(self._store, name)


def encode_distributed(sae, store, out_dir, *, batch_tokens: int = 8192, top_k: int = 128, device=None,
                       backend: str = "auto", resume: bool = True, progress: bool = True, sae_dir=None,
                       rank: int | None = None, world: int | None = None):
    """:func:`~saeengine.eval.encode.encode_store` over the ranks of torch.distributed: every
    rank calls it with the same arguments (``device``: this rank's, e.g. cuda:LOCAL_RANK;
    None as encode_store); returns the merged output's EncodedDataset on rank 0 and None on the others. One
    process (no torch.distributed, or a world of 1): exactly encode_store.

    Rank 0 returns the merged output's EncodedDataset once it is written; the other ranks
    return None as soon as every part is encoded (they wait in no collective while rank 0
    merges, which can take longer than the collective timeout)."""
    from ..eval.encode import encode_store

    asked, (rank, world) = (rank, world), rank_world()
    if world == 1:
        rank_world(*asked)  # InputError for a rank or world this process does not have
        return encode_store(sae, store, out_dir, batch_tokens=batch_tokens, top_k=top_k, device=device,
                            backend=backend, resume=resume, progress=progress, sae_dir=sae_dir)
    # The first collective, cheap: every rank is here, so rank 0 is past the merge of an
    # earlier call and every rank sees the folders as they are now; a wrong rank or world
    # given on one rank fails every rank.
    comm.agreed(lambda: (rank_world(*asked), named_out_dir(out_dir)), "starting", label="start")
    job = comm.agreed(lambda: _prepare(sae, store, out_dir, batch_tokens, top_k, device, backend, resume, progress,
                                       sae_dir, world, rank), "checking the encode settings", label="status")
    check_same_config(Mesh(MeshSpec(data=world, latent=1), rank, rank, 0), job.fields, "encode setting")
    if not job.done:
        comm.agreed(lambda: _encode_part(job, rank, world, progress and rank == 0),
                    f"encoding the parts in {parts_dir(job.out_dir)}", label="status")
    # The last collective: from here rank 0 works alone (the merge), the others are done.
    if rank != 0:
        return None
    _finish(job, world)
    from ..eval.encoded import EncodedDataset

    return EncodedDataset(job.out_dir)


@dataclasses.dataclass
class _Job:
    sae: object
    sae_dir: Path | None
    store: object
    out_dir: Path
    device: torch.device
    backend: str
    settings: dict
    ident: dict
    starts: list[int]
    fields: dict
    done: bool        # out_dir holds the finished encoding of this SAE, store and settings


def _prepare(sae, store, out_dir, batch_tokens, top_k, device, backend, resume, progress, sae_dir, world,
             rank: int = 0) -> _Job:
    from ..errors import DataError
    from ..eval.encoded import SUMMARY, check_out_dir, read_summary

    out_dir = named_out_dir(out_dir)
    enc._check_settings(batch_tokens, top_k, resume, progress, backend)
    check_out_dir(out_dir)
    store = enc._open_store(store)
    if store.n_tokens == 0:
        raise DataError(f"the store {store.directory} holds no tokens: there is nothing to encode; record "
                        "activations into it first")
    sae, sae_dir, device = enc._open_sae(sae, sae_dir, device)
    enc._check_compatible(sae, sae_dir, store)
    layout, width = enc.code_layout(sae)
    settings = {"batch_tokens": int(batch_tokens), "top_k": int(top_k), "code_layout": layout, "code_width": width}
    ident = enc.identity(sae, sae_dir, store)
    done = resume and (out_dir / SUMMARY).exists()
    if done:  # a finished folder of another SAE / store / settings raises DataMismatchError, as encode_store does
        summary = read_summary(out_dir)
        enc._check_same(out_dir, summary, summary["settings"], ident, settings, "the finished encoding")
    elif resume or rank == 0:  # resume=False: rank 0 alone removes old parts (the others would race it)
        _check_parts(out_dir, resume, world)
    fields = {"sae_checksum": ident["sae"]["checksum"], "sae_dir": ident["sae"]["dir"],
              "store_dir": ident["store"]["dir"], "store_content_hash": ident["store"]["content_hash"], **settings,
              "out_dir": str(out_dir.resolve()), "resume": resume, "backend": backend, "device_type": device.type,
              "world": world, "done": done}
    starts = [] if done else batch_starts(store, settings["batch_tokens"])
    return _Job(sae, sae_dir, store, out_dir, device, backend, settings, ident, starts, fields, done)


def _check_parts(out_dir: Path, resume: bool, world: int) -> None:
    parts = parts_dir(out_dir)
    worlds = check_parts_folder(parts, KIND)  # InputError for a folder this code did not make
    if worlds is None:
        return
    if not resume:  # start over: the parts of an interrupted run go
        remove_parts(parts, KIND)
        return
    if worlds and worlds != [world]:
        raise InputError(f"{parts} holds the parts of an encode by {worlds[0]} ranks, but this run has {world}; "
                         f"resume it with {worlds[0]} ranks, or pass resume=False (CLI: --no-resume) to start over")


def _first_shift(job: _Job) -> torch.Tensor:
    """The metrics' shift of the single pass: the mean of its first batch's tokens, as
    ReconstructionMetrics computes it (float32 on the pass's device, then float64)."""
    rows = np.arange(job.starts[0], job.starts[1], dtype=np.int64)
    x = job.store.get(rows).to(job.device).float()
    return x.double().mean(0).cpu()


def _encode_part(job: _Job, rank: int, world: int, progress: bool) -> None:
    from ..eval.encode_files import CodeFiles
    from ..eval.encoded import RESUME

    claim_parts(parts_dir(job.out_dir), KIND)
    a, b = row_ranges(job.starts, world)[rank]
    if a == b:
        return
    view = _StoreRows(job.store, b)
    directory = part_dir(job.out_dir, rank, world)
    ident = enc.identity(job.sae, job.sae_dir, view)
    with exclusive_lock(directory, "encode part folder"):
        found = None
        if (directory / RESUME).exists():
            found = enc._read_resume(directory)
            enc._check_same(directory, found.progress["identity"], found.progress["settings"], ident, job.settings,
                            "an unfinished encode part")
        else:  # a new part: the pass starts at row a, from the accumulators' fresh states
            for path in directory.iterdir():
                if path.name != ".lock":
                    path.unlink()
            files = CodeFiles(directory, job.settings["code_layout"], b, job.settings["code_width"])
            files.create()
            files.close()
            found = enc._Resume(_start_progress(job, a, ident), _start_state(job))
        shift = _first_shift(job)
        with enc._evaluating(job.sae, job.device):
            _PartPass(job.sae, view, directory, ident, job.settings, job.device, job.backend, found,
                      shift=shift).run(progress)


def _start_progress(job: _Job, a: int, ident: dict) -> dict:
    """The progress of a pass that has done every row before ``a`` (and nothing of its own)."""
    last_image = -1 if a == 0 else int(job.store.sources(np.array([a - 1]))[0][0])
    return {"identity": ident, "settings": job.settings, "rows": a, "batches": 0, "entries": 0, "images": 0,
            "last_image": last_image}


def _start_state(job: _Job) -> dict[str, torch.Tensor]:
    """The accumulators' fresh states, as a commit holds them."""
    accumulators = enc.make_accumulators(job.sae.cfg.d_sae, job.settings["top_k"])
    return {f"{name}/{key}": t for name, acc in accumulators.items() for key, t in acc.state_dict().items()}


def _preset_metrics(shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fresh ReconstructionMetrics state whose shift is the single pass's."""
    from ..eval.metrics import ReconstructionMetrics

    state = ReconstructionMetrics().state_dict()
    state.update(shift=shift.clone(), sum_dx=torch.zeros_like(shift), sum_err=torch.zeros_like(shift))
    return state


class _MetricIncrements:
    """Every batch's exact contribution to the metrics' sums, as the single pass adds it
    (``s[key] += batch term``): a fresh accumulator (the single pass's shift) fed one batch
    holds exactly those terms (0 + t = t). Rank 0 adds them up in the single pass's order,
    which gives its float64 sums bit for bit.

    Files: ``metric_shift.safetensors`` (the shift [d] float64, written once) and
    ``metric_terms.bin``, append-only: one fixed-size record a batch (the keys of
    :func:`_term_layout` in order, raw little-endian bytes: (10 + 2 d) x 8 bytes), appended
    and fsynced before each commit; on resume it is cut back to the committed batches
    (records past them are a commit that did not happen)."""

    FILE = "metric_terms.bin"
    SHIFT = "metric_shift.safetensors"

    def __init__(self, directory: Path, shift: torch.Tensor, batches: int):
        from safetensors.torch import save_file

        from .._atomic import atomic_write

        self.directory, self.shift = Path(directory), shift.cpu().contiguous()
        self.path = self.directory / self.FILE
        self.record = _record_bytes(self.shift.shape[0])
        self.pending: list[bytes] = []
        if batches == 0:  # a new part: its shift, and no terms yet
            atomic_write(self.directory / self.SHIFT, lambda tmp: save_file({"shift": self.shift}, str(tmp)))
            with open(self.path, "wb") as fh:
                os.fsync(fh.fileno())
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < batches * self.record or not torch.equal(_read_shift(self.directory), self.shift):
            raise StoreError(f"{self.path} holds {size // self.record} batches' metric terms (or another shift), "
                             f"the last commit {batches}; delete {self.directory} and run again to encode that "
                             "part over")
        os.truncate(self.path, batches * self.record)

    def add(self, tokens) -> dict[str, torch.Tensor]:
        """One batch's terms (kept for the next commit), as a dict of CPU tensors."""
        from ..eval.metrics import ReconstructionMetrics

        one = ReconstructionMetrics()
        one.load_state_dict(_preset_metrics(self.shift))
        one.update(tokens)
        terms = {k: t for k, t in one.state_dict().items() if k != "shift"}
        self.pending.append(b"".join(terms[k].contiguous().numpy().tobytes() for k, _, _ in
                                     _term_layout(self.shift.shape[0])))
        return terms

    def save(self) -> None:
        """Append the batches since the last commit, durably (before the commit that counts them)."""
        with open(self.path, "ab") as fh:
            fh.write(b"".join(self.pending))
            fh.flush()
            os.fsync(fh.fileno())
        self.pending = []


def _term_layout(d: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of a batch's terms, in record order."""
    state = _preset_metrics(torch.zeros(d, dtype=torch.float64))
    return [(k, t.dtype, tuple(t.shape)) for k, t in sorted(state.items()) if k != "shift"]


def _record_bytes(d: int) -> int:
    return sum(torch.zeros(shape, dtype=dtype).numel() * torch.zeros((), dtype=dtype).element_size()
               for _, dtype, shape in _term_layout(d))


def _read_shift(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / _MetricIncrements.SHIFT))["shift"]


def read_terms(directory: Path, batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The first ``batches`` (None: all) records of a part's metric_terms.bin."""
    d = _read_shift(directory).shape[0]
    layout, record = _term_layout(d), _record_bytes(d)
    raw = np.fromfile(Path(directory) / _MetricIncrements.FILE, dtype=np.uint8)
    n = len(raw) // record if batches is None else batches
    if n * record > len(raw):
        raise StoreError(f"{Path(directory) / _MetricIncrements.FILE} holds {len(raw) // record} batches' metric "
                         f"terms, the last commit {n}; delete {directory} and run again to encode that part over")
    out = []
    for i in range(n):
        offset, terms = i * record, {}
        for key, dtype, shape in layout:
            count = int(np.prod(shape)) if shape else 1
            t = torch.frombuffer(bytearray(raw[offset:offset + count * torch.zeros((), dtype=dtype).element_size()]),
                                 dtype=dtype)
            offset += t.numel() * t.element_size()
            terms[key] = t.reshape(shape)
        out.append(terms)
    return out


class _Logged:
    """The metrics accumulator of a part: each batch's terms computed once (kept for the
    merge) and added to the state, as the accumulator's own update adds them."""

    def __init__(self, inner, log: _MetricIncrements):
        self.inner, self.log = inner, log

    def update(self, tokens) -> None:
        terms = self.log.add(tokens)
        state = self.inner.state_dict()
        if state["shift"].shape != self.log.shift.shape:  # fresh: the part's sums are kept with the global shift
            state = _preset_metrics(self.log.shift)
        self.inner.load_state_dict({k: t if k == "shift" else t + terms[k] for k, t in state.items()})

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    def result(self):
        return self.inner.result()


class _PartPass(_Pass):
    """The single pass over one rank's rows. Its last commit (resume.safetensors: the
    accumulators' exact states and the counts) and every batch's metric terms are what
    rank 0 merges: no result files."""

    def __init__(self, *args, shift: torch.Tensor):
        super().__init__(*args)
        self.terms = _MetricIncrements(self.out_dir, shift, self.done["batches"])
        self.accumulators["metrics"] = _Logged(self.accumulators["metrics"], self.terms)

    def _commit(self) -> None:
        self.terms.save()  # durable before the commit point that counts them
        super()._commit()

    def _finish(self) -> None:
        pass


# ----- the merge ------------------------------------------------------------------------------
def _finish(job: _Job, world: int) -> None:
    if not job.done:
        merge_parts(job, world)
    remove_parts(parts_dir(job.out_dir), KIND)


def merge_parts(job: _Job, world: int) -> None:
    """Rank 0: the parts' code rows and accumulator states -> the one encode output."""
    from ..eval.encoded import CSR, RESUME

    ranges = [(r, a, b) for r, (a, b) in enumerate(row_ranges(job.starts, world)) if b > a]
    parts = []
    for r, a, b in ranges:
        directory = part_dir(job.out_dir, r, world)
        found = enc._read_resume(directory) if (directory / RESUME).exists() else None
        if found is None or int(found.progress["rows"]) != b:
            raise StoreError(f"{directory} (the encode part of rows {a}..{b - 1}) is not finished; rerun with "
                             "resume=True (the default) to finish it")
        parts.append((directory, a, b, found))
    with exclusive_lock(job.out_dir, "encode output folder"):
        enc._empty(job.out_dir)  # summary.json first: from here on the folder reads unfinished
        out = _Pass(job.sae, job.store, job.out_dir, job.ident, job.settings, torch.device("cpu"), job.backend,
                    None)
        try:
            states = [p[3].state for p in parts]
            for name in ("stats", "exemplars"):
                out.accumulators[name].load_state_dict(
                    _merge_states(name, [_prefixed(s, name) for s in states], job.settings["top_k"]))
            out.accumulators["metrics"].load_state_dict(_replay_metrics(job, parts))
            counts = [p[3].progress for p in parts]
            out.done = {"rows": job.store.n_tokens, "batches": sum(int(c["batches"]) for c in counts),
                        "entries": sum(int(c["entries"]) for c in counts),
                        "images": sum(int(c["images"]) for c in counts), "last_image": int(counts[-1]["last_image"])}
            entries = 0
            latent_sums = torch.zeros(job.sae.cfg.d_sae, dtype=torch.float64, device=job.device)
            for directory, a, b, found in parts:
                entries = _copy_codes(out.files, directory, [s for s in job.starts if a <= s <= b], entries,
                                      job.settings["code_layout"] == CSR, latent_sums)
            stats = out.accumulators["stats"].state_dict()
            stats["sum"] = latent_sums.cpu()
            out.accumulators["stats"].load_state_dict(stats)
            out._commit()
            out._finish()
        finally:
            out.files.close()


def _replay_metrics(job: _Job, parts) -> dict[str, torch.Tensor]:
    """The metrics state of the single pass: its shift, every batch's terms added in its order."""
    state = None
    for directory, a, b, found in parts:
        if state is None:
            state = _preset_metrics(_read_shift(directory))
        for terms in read_terms(directory, int(found.progress["batches"])):
            for key, t in terms.items():
                state[key] = state[key] + t  # the single pass's s[key] += term, in its order
    return state


def _prefixed(state: dict, name: str) -> dict:
    return {k.split("/", 1)[1]: t for k, t in state.items() if k.split("/", 1)[0] == name}


def _merge_states(name: str, states: list[dict], top_k: int) -> dict:
    """The latent statistics' or exemplars' state over all rows from the ranks' states (rank
    order). Exact: integer counts added, maxima and minima; the latent sums (float64) are
    replayed from the codes instead (_copy_codes); exemplar rows ranked as the pass ranks."""
    merged = {k: t.clone() for k, t in states[0].items()}
    for state in states[1:]:
        if name == "exemplars":
            from ..eval.exemplars import top_rows

            for rule in {k.split(".")[0] for k in state}:
                cols = [torch.cat([merged[f"{rule}.{f}"], state[f"{rule}.{f}"]], dim=1)
                        for f in ("scores", "images", "positions")]
                for f, t in zip(("scores", "images", "positions"), top_rows(*cols, top_k)):
                    merged[f"{rule}.{f}"] = t.contiguous()
            continue
        for key, t in state.items():
            if key == "edges":
                continue  # the same on every rank
            if key == "max":
                merged[key] = torch.maximum(merged[key], t)
            elif key == "min":
                merged[key] = torch.minimum(merged[key], t)
            else:  # n_tokens, count, histogram: integers ("sum" is replaced by the replay)
                merged[key] = merged[key] + t
    return merged


def _copy_codes(files, directory: Path, starts: list[int], entries: int, csr: bool,
                latent_sums: torch.Tensor) -> int:
    """Copy a part's code rows [starts[0], starts[-1]) into the output's files, one of the
    single pass's batches [starts[i], starts[i + 1]) at a time, and add each batch's firing
    values into ``latent_sums`` [F] float64 as LatentStats adds them (index_put_ with
    accumulate, on the pass's device): its float64 sums bit for bit. Returns the entries so far."""
    from ..eval.encoded import INDICES, INDPTR, SOURCES, VALUES

    arrays = {name: np.load(directory / name, mmap_mode="r") for name in
              ((INDPTR, INDICES, VALUES) if csr else (INDICES, VALUES)) + (SOURCES,)}
    a = starts[0]
    device = latent_sums.device
    for lo, hi in zip(starts[:-1], starts[1:]):
        files.sources.pwrite(lo, arrays[SOURCES][lo:hi])
        if not csr:
            values, indices = np.asarray(arrays[VALUES][lo:hi]), np.asarray(arrays[INDICES][lo:hi])
            files.values.pwrite(lo, values)
            files.indices.pwrite(lo, indices)
            fire = values > 0
            values, indices = values[fire], indices[fire]
        else:  # the part's entries start at 0 at its row a (indptr[a] was never written: 0)
            indptr = arrays[INDPTR]
            e0, e1 = int(indptr[lo]) if lo > a else 0, int(indptr[hi])
            files.indptr.pwrite(lo + 1, np.asarray(indptr[lo + 1:hi + 1]) + entries)
            values, indices = np.array(arrays[VALUES][e0:e1]), np.array(arrays[INDICES][e0:e1])
            files.values.append(values)
            files.indices.append(indices)
        if values.size:
            lat = torch.from_numpy(indices.astype(np.int64)).to(device)
            val = torch.from_numpy(values).to(device).double()
            latent_sums.index_put_((lat,), val, accumulate=True)
    if csr:
        entries += int(arrays[INDPTR][starts[-1]])
    with contextlib.suppress(AttributeError):
        for array in arrays.values():
            array._mmap.close()
    return entries


# ----- the command line ---------------------------------------------------------------------------
def run_encode_distributed(args) -> int:
    """``torchrun --nproc-per-node N -m saeengine encode ...``: the process group from
    torchrun's environment (saeengine.distributed.launch: NCCL and cuda:LOCAL_RANK with
    GPUs, gloo and the CPU without), every rank encodes its rows, rank 0 merges and prints
    what saeengine encode prints."""
    from .launch import distributed, world_from_env

    with distributed(f"data={world_from_env()}", args.device) as mesh:
        encoded = encode_distributed(args.sae, args.data, args.out, batch_tokens=args.batch_tokens, top_k=args.top_k,
                                     device=mesh.device, backend=args.backend, resume=not args.no_resume,
                                     progress=not args.no_progress and mesh.rank == 0)
        if mesh.rank != 0:
            return 0
    from ..cli_encode import report_encoded

    report_encoded(encoded, args.out, f" on {mesh.world_size} ranks")
    return 0
