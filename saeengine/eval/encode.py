"""The encode pass: one ordered pass of an SAE over an activation store, writing every
token's code, the per-latent statistics, the exemplars and the reconstruction metrics to
an output folder (its files: saeengine.eval.encoded).

Crash safety, as the store writer's: the pass holds ``out_dir/.lock`` while it runs and
commits every ``COMMIT_EVERY_S`` seconds and at the end. A commit makes the code files
durable, then replaces ``resume.safetensors`` (the accumulators' exact states and the
progress: rows and batches done, code entries, the SAE's checksum, the store's content
hash, the settings) atomically. summary.json is written last, so a folder reads as
finished only once it is. A rerun with ``resume=True`` continues after the last commit
and ends with the files of an uninterrupted pass, byte for byte (same device, backend
and number of torch threads): batches are cut the same way from any batch boundary, and the accumulators
are bit-identical across a save and load. Nothing timed goes into the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._atomic import atomic_write, atomic_write_bytes, fsync_directory
from .._lock import LOCK_FILE, exclusive_lock
from ..errors import ConfigError, DataError, DataMismatchError, InputError, StoreCorruptError, StoreIncompleteError
from ._args import is_int
from ._json import jsonable
from .batch import TokenBatch, code_pairs
from .encode_batches import OrderedBatches
from .encode_files import CodeFiles
from .encoded import (CSR, EXEMPLARS, FIXED, HOLDS, LAYOUT_FILES, RESUME, SOURCES, STATS, SUMMARY, EncodedDataset,
                      check_out_dir, is_own_entry, read_summary)
from .encoded import FORMAT as SUMMARY_FORMAT
from .encoded import VERSION as SUMMARY_VERSION

COMMIT_EVERY_S = 60.0  # seconds of work a kill may lose; each commit writes the accumulators' states
PROGRESS_FORMAT = "saeengine-encode-progress"
FIXED_WIDTH = ("topk",)  # architectures whose code has exactly k entries per token (matryoshka: by its inner)


def encode_store(sae, store, out_dir, *, batch_tokens: int = 8192, top_k: int = 128, device=None,
                 backend: str = "auto", resume: bool = True, progress: bool = True, sae_dir=None) -> EncodedDataset:
    """Encode every token of ``store`` with ``sae`` into ``out_dir``; returns its reader.

    Args:
        sae: an SAE, or a checkpoint folder (SAE.save's, or another library's that
            SAE.from_pretrained reads; then ``sae_dir`` is it).
        store: an ActivationStore (finished), or its folder.
        out_dir: the output folder: new, empty, or one this function wrote.
        batch_tokens: tokens per batch, about: batches hold whole images, cut at image
            boundaries; an image with more tokens is one batch.
        top_k: exemplar images kept per latent and rule.
        device: where the SAE runs (None: an SAE's own device; a folder's SAE goes to the
            GPU when there is one). An SAE object is moved there for the pass and back.
        backend: op backend of encode and decode ("auto": the fastest plan).
        resume: continue an unfinished folder from its last commit, or return a finished
            one of the same SAE, store and settings without work (another raises
            DataMismatchError naming both). False: start over, replacing what is there.
        progress: show a progress bar (tokens).
        sae_dir: the checkpoint folder of an SAE object (named in summary.json; its
            config.json provenance says the layer it was trained on).

    Raises DataMismatchError for an SAE of another d_in than the store's, and warns
    (UserWarning) when the SAE's metadata or training provenance names another layer or
    backbone than the store's. StoreIncompleteError for an unfinished store, ConfigError
    for bad settings, InputError for an out_dir that is a file or another folder,
    LockedError while another pass writes out_dir, DataError for a store without tokens
    or whose images are not in increasing order.
    """
    _check_settings(batch_tokens, top_k, resume, progress, backend)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    store = _open_store(store)
    if store.n_tokens == 0:
        raise DataError(f"the store {store.directory} holds no tokens: there is nothing to encode; record "
                        "activations into it first")
    sae, sae_dir, device = _open_sae(sae, sae_dir, device)
    _check_compatible(sae, sae_dir, store)
    layout, width = code_layout(sae)
    settings = {"batch_tokens": int(batch_tokens), "top_k": int(top_k), "code_layout": layout, "code_width": width}
    ident = identity(sae, sae_dir, store)
    with exclusive_lock(out_dir, "encode output folder"):
        check_out_dir(out_dir)
        found = _existing(out_dir, ident, settings, resume)
        if isinstance(found, EncodedDataset):
            return found
        with _evaluating(sae, device):
            _Pass(sae, store, out_dir, ident, settings, device, backend, found).run(progress)
    return EncodedDataset(out_dir)


# ----- arguments -------------------------------------------------------------------------------
def _check_settings(batch_tokens, top_k, resume, progress, backend) -> None:
    for name, value in (("batch_tokens", batch_tokens), ("top_k", top_k)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    for name, flag in (("resume", resume), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    from ..backends import FAMILIES, implementation_names

    known = tuple(dict.fromkeys(("auto", *FAMILIES, *implementation_names())))
    if not isinstance(backend, str) or backend not in known:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, known))}, got {backend!r}")


def _open_store(store):
    from ..store import ActivationStore
    from ..store.metadata import StoreMetadata
    from ..store.reader import writer_holding

    if isinstance(store, (str, Path)):
        directory = Path(store)
        if not directory.is_dir():
            raise InputError(f"the store {directory} is not a folder; pass an activation store directory "
                             "(saeengine record writes them)")
        meta = StoreMetadata.read(directory)
        if meta.complete:
            return ActivationStore(directory)
    elif isinstance(store, ActivationStore):
        directory, meta = store.directory, store.meta
        if meta.complete:
            return store
    else:
        raise InputError(f"store must be an ActivationStore or its directory, got {type(store).__name__}")
    holder = writer_holding(directory)
    now = f", and {holder} is writing it now" if holder else ""
    raise StoreIncompleteError(f"the store {directory} is unfinished ({meta.n_tokens} tokens in {len(meta.shards)} "
                               f"shards committed{now}): encode needs a finished store. Finish the recording first "
                               "(saeengine record ... --resume, or ActivationWriter(..., resume=True) then close()), "
                               "then run encode again")


def _open_sae(sae, sae_dir, device):
    from ..sae import SAE

    if isinstance(sae, (str, Path)):
        sae_dir = Path(sae)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        sae = SAE.from_pretrained(sae_dir)  # saeengine's checkpoint or another library's (saeengine.interop)
    elif not isinstance(sae, SAE):
        raise InputError(f"sae must be an SAE or its checkpoint folder, got {type(sae).__name__}")
    elif sae_dir is not None and not (Path(sae_dir) / "config.json").is_file():
        raise InputError(f"sae_dir {sae_dir} is not an SAE checkpoint folder (no config.json); pass the folder "
                         "that SAE.save wrote, or sae_dir=None")
    try:
        device = sae.W_enc.device if device is None else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r}: {exc}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r}: no CUDA GPU is available here; use device='cpu' "
                         "(CLI: --device cpu)")
    return sae, None if sae_dir is None else Path(sae_dir), device


def sae_trained_on(sae, sae_dir: Path | None) -> dict[str, tuple[str, str]]:
    """{"layer" / "backbone": (value, where it was found)} from cfg.metadata, else the
    checkpoint's config.json provenance["store"] (the trainer records it)."""
    found = {}
    provenance = {}
    if sae_dir is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            provenance = json.loads((sae_dir / "config.json").read_text()).get("provenance", {}).get("store", {})
    for field in ("layer", "backbone"):
        value = sae.cfg.metadata.get(field)
        if isinstance(value, str) and value:
            found[field] = (value, f"cfg.metadata[{field!r}]")
        elif isinstance(provenance, dict) and isinstance(provenance.get(field), str) and provenance[field]:
            found[field] = (provenance[field], f"training store's {field} in {sae_dir / 'config.json'}")
    return found


def _check_compatible(sae, sae_dir: Path | None, store) -> None:
    if sae.cfg.d_in != store.d_in:
        raise DataMismatchError(f"the SAE reads d_in={sae.cfg.d_in} activations but the store {store.directory} "
                                f"holds d_in={store.d_in}: they come from different layers or models; encode a "
                                "store of the layer the SAE was trained on, or use an SAE trained on this store")
    recorded = {"layer": store.meta.layer, "backbone": store.meta.backbone}
    at = {"layer": "at layer", "backbone": "from backbone"}
    for field, (value, where) in sae_trained_on(sae, sae_dir).items():
        if recorded[field] and recorded[field] != value:
            warnings.warn(f"the SAE was trained on {field} {value!r} ({where}) but the store {store.directory} was "
                          f"recorded {at[field]} {recorded[field]!r}; its codes of these activations may mean "
                          f"nothing: encode a store recorded {at[field]} {value!r}", UserWarning, stacklevel=3)


def code_layout(sae) -> tuple[str, int | None]:
    """("fixed", k) for codes of exactly k entries per token, else ("csr", None)."""
    cfg = sae.cfg
    selection = cfg.matryoshka_inner if cfg.architecture == "matryoshka" else cfg.architecture
    return (FIXED, int(cfg.k)) if selection in FIXED_WIDTH else (CSR, None)


def sae_checksum(sae) -> str:
    """blake2b of the SAE's tensors (names, dtypes, shapes, bytes): the same weights give
    the same checksum wherever they were loaded from."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def identity(sae, sae_dir: Path | None, store) -> dict:
    """What summary.json says the pass read: {"sae": {...}, "store": {...}}."""
    meta = store.meta
    return {
        "sae": {"dir": None if sae_dir is None else str(sae_dir.resolve()), "checksum": sae_checksum(sae),
                "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "config": json.loads(json.dumps(sae.cfg.to_dict()))},
        "store": {"dir": str(Path(store.directory).resolve()), "content_hash": store.content_hash,
                  "backbone": meta.backbone, "layer": meta.layer, "token_kind": meta.token_kind, "d_in": store.d_in,
                  "dtype": meta.dtype, "n_tokens": store.n_tokens},
    }


@contextlib.contextmanager
def _evaluating(sae, device: torch.device):
    """The SAE on ``device`` in eval mode (BatchTopK thresholds), put back afterwards."""
    was_training, was_on = sae.training, sae.W_enc.device
    sae.to(device)
    sae.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        sae.train(was_training)
        sae.to(was_on)


# ----- the folder as found -----------------------------------------------------------------------
@dataclass
class _Resume:
    progress: dict
    state: dict[str, torch.Tensor]


def _describe(ident: dict) -> tuple[str, str]:
    sae, store = ident["sae"], ident["store"]
    name = f"the SAE {sae['dir']}" if sae["dir"] else "an SAE given as an object"
    return (f"{name} (checksum {sae['checksum'][:16]})", f"{store['dir']} (content hash {store['content_hash']})")


def _check_same(out_dir: Path, theirs: dict, their_settings: dict, ours: dict, settings: dict, what: str) -> None:
    same_data = (theirs["sae"]["checksum"] == ours["sae"]["checksum"]
                 and theirs["store"]["content_hash"] == ours["store"]["content_hash"])
    if not same_data:
        (t_sae, t_store), (o_sae, o_store) = _describe(theirs), _describe(ours)
        raise DataMismatchError(f"{out_dir} holds {what} of {t_sae} over the store {t_store}, not of {o_sae} over "
                                f"the store {o_store}; choose another out_dir, or pass resume=False (CLI: --no-resume) "
                                "to replace it")
    changed = {k: (their_settings.get(k), v) for k, v in settings.items() if their_settings.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in changed.items())
        raise DataMismatchError(f"{out_dir} holds {what} with other settings ({listed}); pass the same settings, "
                                "another out_dir, or resume=False (CLI: --no-resume) to replace it")


def _existing(out_dir: Path, ident: dict, settings: dict, resume: bool):
    """A finished folder's reader (same SAE, store, settings), the last commit to resume
    from, or None (start over: the folder is emptied, summary.json first)."""
    if (out_dir / SUMMARY).exists() and resume:
        summary = read_summary(out_dir)
        try:
            _check_same(out_dir, summary, summary["settings"], ident, settings, "the finished encoding")
        except (KeyError, TypeError) as exc:
            raise StoreCorruptError(f"{out_dir / SUMMARY} lacks {exc}; pass resume=False (CLI: --no-resume) to "
                                    "encode the folder again") from None
        with contextlib.suppress(FileNotFoundError):  # killed between summary.json and this removal
            (out_dir / RESUME).unlink()
        return EncodedDataset(out_dir)
    if (out_dir / RESUME).exists() and not (out_dir / SUMMARY).exists() and resume:
        found = _read_resume(out_dir)
        _check_same(out_dir, found.progress["identity"], found.progress["settings"], ident, settings,
                    "an unfinished encoding")
        return found
    replaced = (out_dir / SUMMARY).exists() or (out_dir / RESUME).exists()
    _empty(out_dir)
    if replaced:
        warnings.warn(f"resume=False: the encoding in {out_dir} was removed; starting over", UserWarning, stacklevel=3)
    return None


def _empty(out_dir: Path) -> None:
    """Remove the encode files, summary.json first: from then on the folder reads unfinished."""
    with contextlib.suppress(FileNotFoundError):
        (out_dir / SUMMARY).unlink()
        fsync_directory(out_dir)
    for path in out_dir.iterdir():
        if is_own_entry(path.name) and path.name != LOCK_FILE:
            path.unlink()
    fsync_directory(out_dir)


def _read_resume(out_dir: Path) -> _Resume:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out_dir / RESUME
    try:
        with safe_open(str(path), "pt") as f:
            progress = json.loads((f.metadata() or {})["progress"])
        state = load_file(str(path))
        if progress.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"format {progress.get('format')!r}")
        missing = [key for key in ("identity", "settings", "rows", "batches", "entries", "images", "last_image")
                   if key not in progress]
        if missing:
            raise ValueError(f"its progress lacks {missing}")
    except Exception as exc:  # noqa: BLE001 - any damage reads as one error with its fix
        raise StoreCorruptError(f"{path} (the last commit of an unfinished encoding) is damaged ({exc}); pass "
                                "resume=False (CLI: --no-resume) to start the pass over") from exc
    return _Resume(progress, state)


def make_accumulators(d_sae: int, top_k: int) -> dict:
    """The pass's accumulators, by the names their states are saved under."""
    from .exemplars import Exemplars
    from .latent_stats import LatentStats
    from .metrics import ReconstructionMetrics

    return {"metrics": ReconstructionMetrics(), "stats": LatentStats(d_sae), "exemplars": Exemplars(d_sae, top_k)}


# ----- the pass ------------------------------------------------------------------------------------
def _warn_if_computed_elsewhere(out_dir: Path, then: dict | None, now: dict) -> None:
    """Resuming on another device, backend or thread count works, but float sums may then
    round differently from an uninterrupted pass: say so, naming both."""
    if then is not None and then != now:
        changed = ", ".join(f"{k} {then.get(k)!r} -> {v!r}" for k, v in now.items() if then.get(k) != v)
        warnings.warn(f"{out_dir}: resuming with {changed}; the result is correct, but its last bits may differ "
                      "from a pass run on one setting (rerun with resume=False for a bit-exact one)",
                      UserWarning, stacklevel=4)


class _Pass:
    def __init__(self, sae, store, out_dir: Path, ident: dict, settings: dict, device: torch.device, backend: str,
                 resume: _Resume | None):
        self.sae, self.store, self.out_dir, self.ident, self.settings = sae, store, out_dir, ident, settings
        self.device, self.backend = device, backend
        self.accumulators = make_accumulators(sae.cfg.d_sae, settings["top_k"])
        self.files = CodeFiles(out_dir, settings["code_layout"], store.n_tokens, settings["code_width"])
        if resume is None:
            self.files.create()
            self.done = {"rows": 0, "batches": 0, "entries": 0, "images": 0, "last_image": -1}
        else:
            self.done = {k: int(resume.progress[k]) for k in ("rows", "batches", "entries", "images", "last_image")}
            _warn_if_computed_elsewhere(out_dir, resume.progress.get("computed_on"), self._computed_on())
            self.files.reopen(self.done["entries"])
            for name, acc in self.accumulators.items():
                acc.load_state_dict({k.split("/", 1)[1]: t for k, t in resume.state.items()
                                     if k.split("/", 1)[0] == name})

    def _computed_on(self) -> dict:
        """What the bits of a pass depend on beyond its inputs (kept with each commit)."""
        return {"device": self.device.type, "backend": self.backend, "torch_threads": torch.get_num_threads()}

    def run(self, progress: bool) -> None:
        n = self.store.n_tokens
        batches = OrderedBatches(self.store, self.settings["batch_tokens"], self.done["rows"], self.done["last_image"])
        bar = tqdm(total=n, initial=self.done["rows"], desc="encode", unit="token", unit_scale=True,
                   disable=not progress, dynamic_ncols=True)
        try:
            last_commit = time.monotonic()
            for batch in batches:
                self._step(batch)
                bar.update(batch.stop - batch.row)
                if time.monotonic() - last_commit >= COMMIT_EVERY_S and batch.stop < n:
                    self._commit()
                    last_commit = time.monotonic()
            self._commit()
            self._finish()
        finally:
            bar.close()
            self.files.close()

    def _step(self, batch) -> None:
        device = self.device
        x = batch.x.to(device, non_blocking=True).float()
        code = self.sae.encode(x, backend=self.backend)
        x_hat = self.sae.decode(code, backend=self.backend).float()
        values, indices = code_pairs(code)
        image, position, is_cls = (torch.from_numpy(a).to(device) for a in (batch.image, batch.position, batch.is_cls))
        tokens = TokenBatch(x=x, x_hat=x_hat, values=values, indices=indices, image=image, position=position,
                            is_cls=is_cls, first_row=batch.row)
        for acc in self.accumulators.values():
            acc.update(tokens)
        values_np, indices_np = values.cpu().numpy(), indices.cpu().numpy()
        if self.settings["code_layout"] == FIXED and values_np.shape[1] != self.settings["code_width"]:
            raise RuntimeError(f"the SAE's code has {values_np.shape[1]} entries per token, not its k="
                               f"{self.settings['code_width']}")
        self.files.write(batch.row, values_np, indices_np, batch.image, batch.position)
        self.done["rows"] = batch.stop
        self.done["batches"] += 1
        self.done["entries"] = self.files.entries if self.settings["code_layout"] == CSR else 0
        self.done["images"] += 1 + int(np.count_nonzero(np.diff(batch.image)))
        self.done["last_image"] = int(batch.image[-1])

    def _commit(self) -> None:
        """Code files durable first, then the states and progress in one atomic replace."""
        from safetensors.torch import save_file

        self.files.sync()
        state = {f"{name}/{key}": t.contiguous() for name, acc in self.accumulators.items()
                 for key, t in acc.state_dict().items()}
        progress = {"format": PROGRESS_FORMAT, "identity": self.ident, "settings": self.settings,
                    "computed_on": self._computed_on(), **self.done}
        atomic_write(self.out_dir / RESUME,
                     lambda tmp: save_file(state, str(tmp), metadata={"progress": json.dumps(progress)}))

    def _finish(self) -> None:
        from safetensors.torch import save_file

        stats = {k: _tensor(v) for k, v in self.accumulators["stats"].result().items()}
        exemplars = {f"{rule}.{field}": _tensor(t) for rule, table in self.accumulators["exemplars"].result().items()
                     for field, t in table.items()}
        for name, tensors in ((STATS, stats), (EXEMPLARS, exemplars)):
            atomic_write(self.out_dir / name,
                         lambda tmp, tensors=tensors, name=name: save_file(tensors, str(tmp),
                                                                           metadata={"format": f"saeengine-{name}"}))
        metrics = dict(self.accumulators["metrics"].result())
        for key in ("dead_fraction", "dense_fraction"):
            metrics[key] = float(stats[key])
        summary = {
            "format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, **self.ident, "settings": self.settings,
            "counts": {"tokens": self.store.n_tokens, "images": self.done["images"],
                       "image_ids": self.done["last_image"] + 1, "d_sae": self.sae.cfg.d_sae,
                       "batches": self.done["batches"], "code_entries": self.files.entries},
            "metrics": jsonable(metrics),
            "files": self._files_table(stats, exemplars),
        }
        atomic_write_bytes(self.out_dir / SUMMARY, (json.dumps(summary, indent=1, allow_nan=False) + "\n").encode())
        (self.out_dir / RESUME).unlink()
        fsync_directory(self.out_dir)

    def _files_table(self, stats: dict, exemplars: dict) -> dict:
        layout = self.settings["code_layout"]
        table = {}
        for name in LAYOUT_FILES[layout] + (SOURCES,):
            f = self.files.named[name]
            holds = HOLDS[SOURCES] if name == SOURCES else HOLDS[(layout, name)]
            table[name] = {"shape": list(f.shape), "dtype": str(f.dtype), "holds": holds}
        for name, tensors in ((STATS, stats), (EXEMPLARS, exemplars)):
            table[name] = {"shape": [], "dtype": "safetensors", "holds": HOLDS[name],
                           "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                                       for k, t in tensors.items()}}
        table[SUMMARY] = {"shape": [], "dtype": "json", "holds": HOLDS[SUMMARY]}
        return table


def _tensor(value) -> torch.Tensor:
    return (value if isinstance(value, torch.Tensor) else torch.tensor(value)).detach().cpu().contiguous()
