"""SAE checkpoints: ``sae.safetensors`` (tensors) + ``config.json`` (config, checksum, provenance).

Format version 2 (what :func:`save_sae` writes):

- ``sae.safetensors``: every tensor of the SAE's state_dict; its header metadata holds
  ``format``, ``checkpoint_id`` and ``sae_config`` (the SAEConfig as saved, JSON).
- ``config.json``: ``format``, ``format_version``, ``checkpoint_id``, ``library_version``,
  ``config`` (every SAEConfig field), ``normalization`` ({kind, present}), ``tensors``
  ({name: {shape, dtype}}), ``weights`` ({file, bytes, sha256} of sae.safetensors) and
  ``provenance``.

Saving refuses a poisoned SAE (NaN or inf in a parameter or in the normalization
statistics: NonFiniteError, nothing written). Both files are written under temporary
names; config.json is renamed into place once the weights are whole on disk, then the
weights. A failed save (an exception, a full disk) leaves the checkpoint already there as
it was; a crash in the instant between the two renames leaves a pair whose
``checkpoint_id`` differ, which loading refuses ("different saves").

Loading raises CheckpointError naming the file and the field, unless:

- config.json holds every field of its format version with its type and no other, and a
  ``format_version`` this library reads (a newer one: upgrade saeengine);
- ``config`` holds every SAEConfig field, valid (none takes a default on load);
- the two files come from one save (their checkpoint_ids match);
- sae.safetensors has the recorded size and SHA-256 (a flipped byte anywhere, header or
  data: "corrupted: checksum mismatch");
- its tensors have the names, shapes and dtypes config.json declares and the config
  implies, and it was saved with the config that config.json holds (an edit of any field
  but the free-form ``metadata`` is refused), with ``normalization`` agreeing;
- every value is finite (NaN or inf: the SAE diverged; only BatchTopK's ``threshold``
  buffer may be NaN, meaning "not set yet"), and with ``normalization="none"`` the
  statistics are the identity (an edit from "mean_norm" would drop fitted ones).

Format version 1 (no checksum, no recorded config) still loads, with a UserWarning that it
is unverified (corruption of its data bytes cannot be detected); the SAEConfig fields
added since version 1 was written (``LEGACY_V1_FIELDS``) take the values that the version
which wrote it used. Save it again to get a verified checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ._atomic import atomic_write
from .checkpoint_checks import check_tensors, config_from, nan_markers, nonfinite, read_config, read_weights, sha256
# The format's names stay importable from here, where they were defined before (the tests read
# _FIELDS, LEGACY_V1_FIELDS and _sha256 through this module).
from .checkpoint_format import _FIELDS as _FIELDS
from .checkpoint_format import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE
from .checkpoint_format import LEGACY_V1_FIELDS as LEGACY_V1_FIELDS
from .checkpoint_format import NORM_BUFFERS as NORM_BUFFERS
from .errors import CheckpointError, NonFiniteError

_sha256 = sha256


# ----- saving ---------------------------------------------------------------------------
def _state_tensors(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}


def save_sae(sae, directory: str | Path, provenance: dict | None = None) -> Path:
    """Write ``sae`` to ``directory`` (format version 2, see the module docstring).

    Raises NonFiniteError (nothing written) for an SAE with NaN or inf in a parameter or
    in its normalization statistics, CheckpointError for a ``provenance`` that JSON cannot
    hold, DiskFullError for a full disk; each leaves a checkpoint already in ``directory``
    as it was.
    """
    from . import __version__

    directory = Path(directory)
    tensors = _state_tensors(sae)
    poisoned = nonfinite(tensors, nan_markers(sae))
    if poisoned:
        raise NonFiniteError(f"refusing to save a poisoned SAE to {directory}: {', '.join(poisoned)} hold NaN or "
                             "inf (its training diverged, or the data held NaN); nothing was written and a "
                             "checkpoint already there is kept. Lower the learning rate or clean the data")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: is a file; SAE.save writes a folder ({CONFIG_FILE}, {WEIGHTS_FILE})")
    checkpoint_id = uuid.uuid4().hex
    header = {"format": FORMAT, "checkpoint_id": checkpoint_id,
              "sae_config": json.dumps(sae.cfg.to_dict(), sort_keys=True)}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "library_version": __version__,
        "config": sae.cfg.to_dict(),
        "normalization": {"kind": sae.cfg.normalization, "present": sae.cfg.normalization != "none"},
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()},
        "weights": {"file": WEIGHTS_FILE, "bytes": 0, "sha256": ""},  # filled in once the file is written
        "provenance": {
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **(provenance or {}),
        },
    }
    try:  # before any file is touched
        json.dumps(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save to {directory}: provenance is not JSON-serializable ({err}); "
                              f"{CONFIG_FILE} stores it: pass str, int, float, bool, None, lists and dicts") from None
    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as err:
            # It carries the OS error only in its text ("... (os error 28)") and deletes its
            # file, so neither an errno nor the free space would tell atomic_write the disk is full.
            found = re.search(r"\(os error (\d+)\)", str(err))
            if found is None:
                raise
            raise OSError(int(found.group(1)), f"writing {tmp} failed: {err}") from err
        config["weights"].update(bytes=tmp.stat().st_size, sha256=sha256(tmp))
        # config.json goes into place only once the weights are whole in their temporary file:
        # a failure up to here changes nothing; a crash before the weights' rename leaves a
        # pair whose checkpoint_ids differ.
        atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

    atomic_write(directory / WEIGHTS_FILE, write_weights)
    return directory


# ----- loading --------------------------------------------------------------------------
def load_sae(directory: str | Path, device: torch.device | str = "cpu"):
    """Read a checkpoint written by :func:`save_sae`, verified as the module docstring
    lists; every failure is a CheckpointError naming the file and the field."""
    from .sae import SAE

    directory = Path(directory)
    if not directory.is_dir():
        hint = (f"; pass its folder {directory.parent}" if directory.name in (CONFIG_FILE, WEIGHTS_FILE)
                and directory.is_file() else "")
        raise CheckpointError(f"{directory}: not a directory; pass the folder that SAE.save wrote{hint}")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    data = read_config(config_path)
    cfg, filled = config_from(config_path, data)
    tensors, header = read_weights(weights_path, config_path, data)
    sae = SAE(cfg, device="meta")
    check_tensors(sae, cfg, data, tensors, header, config_path, weights_path)
    if data["format_version"] == 1:
        legacy = f"; the fields added since ({', '.join(filled)}) took their values of then" if filled else ""
        warnings.warn(f"{directory}: unverified: a format_version 1 checkpoint keeps no checksum, so a corrupted "
                      f"{WEIGHTS_FILE} cannot be detected{legacy}. Save it again (SAE.load(...).save(...)) to "
                      "get a verified one", UserWarning, stacklevel=3)
    sae.load_state_dict(tensors, assign=True)
    return sae.to(device)
