"""A pickle that runs code when loaded: the probe of the "no pickle execution" tests. An
unsafe ``torch.load(weights_only=False)`` of an object holding a Payload writes SIDE_EFFECT
into its marker file; a safe reader must refuse the file and leave the marker absent."""

from __future__ import annotations

from pathlib import Path

SIDE_EFFECT = "side-effect ran"


def _side_effect(marker: str) -> None:
    Path(marker).write_text(SIDE_EFFECT)


class Payload:
    """Pickles as a call of _side_effect: unpickling it without weights_only runs it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))
