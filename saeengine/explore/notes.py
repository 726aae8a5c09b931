"""Human names for latents: ``DIR/explore-notes.json`` ({"format", "notes": {"<id>": text}}),
rewritten whole and atomically on every change (a crash leaves the old file or the new
one, never half of one), read back when the server starts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from .._atomic import atomic_write_bytes
from ..errors import DataError, InputError

NOTES = "explore-notes.json"
FORMAT = "saeengine-explore-notes"
MAX_NOTE = 2000  # characters


class Notes:
    """The notes of one DIR; ``notes.all`` is {"<latent id>": text} (empty notes are dropped)."""

    def __init__(self, root: Path):
        self.path = Path(root) / NOTES
        self._lock = threading.Lock()
        self.all: dict[str, str] = {}
        if self.path.is_file():
            try:
                found = json.loads(self.path.read_bytes())
                notes = found.get("notes") if isinstance(found, dict) else None
                if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
                    raise ValueError("no 'notes' object of strings")
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{self.path} is not an explorer notes file ({exc}); move it away (the explorer "
                                "starts a new one)") from exc
            self.all = {str(k): v for k, v in notes.items()}

    def set(self, latent: int, note) -> str:
        if not isinstance(note, str):
            raise InputError(f"note must be a string, got {type(note).__name__}")
        note = note.strip()
        if len(note) > MAX_NOTE:
            raise InputError(f"the note has {len(note)} characters; keep it under {MAX_NOTE}")
        with self._lock:
            notes = dict(self.all)
            if note:
                notes[str(latent)] = note
            else:
                notes.pop(str(latent), None)
            body = {"format": FORMAT, "notes": dict(sorted(notes.items(), key=lambda kv: int(kv[0])))}
            atomic_write_bytes(self.path, (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode())
            self.all = notes
        return note
