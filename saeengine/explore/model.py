"""The model behind an encode output, loaded on first use: the backbone the store was
recorded from (at the recorded image size), the SAE (summary.json's sae.dir) and the
head (the backbone's own output: EfficientNet-Lite0's ImageNet logits). Everything the
image page, uploads and interventions run goes through :class:`Model`, one forward at a
time (a lock: torch modules are not re-entrant across threads)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..errors import InputError

# Backbone families that load offline with no source argument (load_backbone(name)).
OFFLINE_BACKBONES = ("efficientnet-lite0",)
IMAGENET_CLASSES = 1000


class Unavailable(InputError):
    """The model cannot run here (no backbone, no SAE, no images): HTTP 409 with the reason."""


class Model:
    """Lazy backbone + SAE + head of one encode output.

    ``layer``: the recorded block ("blocks.5"); ``prefix``: token positions before the
    patches in the layer's sequence (0 for feature maps); ``grid``: [h, w] patches.
    """

    def __init__(self, encoded, store, layer: str, grid, prefix: int):
        self.encoded, self.store, self.layer, self.grid, self.prefix = encoded, store, layer, grid, prefix
        self.lock = threading.RLock()
        self._loaded = None
        self._why_not: str | None = None
        self._names: list[str] | None = None

    # ----- loading ----------------------------------------------------------------------
    def why_not(self) -> str | None:
        """None when the model can be loaded, else the reason (without loading anything big)."""
        backbone = (self.encoded.summary.get("store") or {}).get("backbone")
        if backbone not in OFFLINE_BACKBONES:
            return (f"the store was recorded from the backbone {backbone!r}, which explore loads only for "
                    f"{', '.join(OFFLINE_BACKBONES)}; the browse pages work, the image page does not")
        sae_dir = (self.encoded.summary.get("sae") or {}).get("dir")
        if not sae_dir:
            return "summary.json does not say where the SAE is (sae.dir); encode again with --sae DIR"
        return self._why_not

    def load(self):
        """(backbone, sae) loaded once; Unavailable with the reason otherwise."""
        with self.lock:
            if self._loaded is not None:
                return self._loaded
            why = self.why_not()
            if why:
                raise Unavailable(why)
            from ..backbones import load_backbone
            from ..sae import SAE

            info = self.encoded.summary
            try:
                sae = SAE.from_pretrained(info["sae"]["dir"]).eval()
                backbone = load_backbone(info["store"]["backbone"])
            except Exception as exc:  # noqa: BLE001 - reported to the page as the reason
                self._why_not = f"the model cannot be loaded ({type(exc).__name__}: {exc})"
                raise Unavailable(self._why_not) from exc
            size = (getattr(self.store, "meta", None) and self.store.meta.extra or {}).get("image_size")
            if size:
                backbone.image_size = int(size)
            self._loaded = (backbone, sae)
            return self._loaded

    # ----- head -------------------------------------------------------------------------
    def class_names(self, n: int) -> list[str]:
        """Names of the head's n classes: ImageNet's (WordNet lemmas) for 1000, else "class i"."""
        if self._names is None or len(self._names) != n:
            names = [f"class {i}" for i in range(n)]
            if n == IMAGENET_CLASSES:
                try:
                    from ..eval.wordnet import imagenet_hierarchy

                    tree = imagenet_hierarchy()
                    names = [tree.names.get(w, w) for w in tree.class_ids]
                except Exception:  # noqa: BLE001 - names are cosmetic
                    pass
            self._names = names
        return self._names

    def head_kind(self) -> str | None:
        return "imagenet" if self.why_not() is None else None

    # ----- running ----------------------------------------------------------------------
    def pixels(self, image) -> torch.Tensor:
        """A PIL image -> [1, 3, S, S] preprocessed pixels."""
        backbone, _ = self.load()
        return backbone.preprocess([image])

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Clean class probabilities [C] of one image."""
        backbone, _ = self.load()
        with self.lock:
            return backbone.forward(pixels).float().softmax(1)[0].numpy()

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The SAE codes of one image's tokens at the layer: (values [T, w] f32, indices
        [T, w] int64, positions [T] int64), patches only (positions from ``prefix``)."""
        from ..eval.batch import code_pairs

        backbone, sae = self.load()
        caught = {}

        def catch(module, inputs, output):
            caught["t"] = backbone.to_tokens(output)[0].float()

        with self.lock:
            handle = backbone.layer_module(self.layer).register_forward_hook(catch)
            try:
                backbone.forward(pixels)
            finally:
                handle.remove()
            tokens = caught["t"][self.prefix:]
            values, indices = code_pairs(sae.encode(tokens))
        positions = np.arange(self.prefix, self.prefix + tokens.shape[0], dtype=np.int64)
        return values.numpy().astype(np.float32), indices.numpy().astype(np.int64), positions

    def intervene(self, pixels: torch.Tensor, latents: list[int], scales: list[float], maxima: torch.Tensor,
                  positions: list[int] | None):
        """saeengine.eval.interventions.intervene on one image -> (before [C], after [C])."""
        from ..eval.interventions import intervene

        backbone, sae = self.load()
        with self.lock:
            result = intervene(backbone, self.layer, sae, pixels, latents=latents, scales=scales, maxima=maxima,
                               positions=positions)
        return result.before[0].numpy(), result.after[0].numpy()

    @torch.no_grad()
    def head_effect(self, latent: int, maximum: float, pixels: torch.Tensor, top: int = 5) -> dict:
        """[P] The decoder direction's effect on the head: the mean change of the head's
        logits when m_j d_j (raw activation space) is added at every token of the layer of
        ``pixels`` [n, 3, S, S]; the classes it raises most and lowers most."""
        backbone, sae = self.load()
        direction = (sae.W_dec[latent].float() * sae.norm_scale.float()) * float(maximum)

        def push(module, inputs, output):
            tokens = backbone.to_tokens(output)
            return backbone.from_tokens(output, tokens + direction.to(tokens.dtype))

        with self.lock:
            clean = backbone.forward(pixels).float()
            handle = backbone.layer_module(self.layer).register_forward_hook(push)
            try:
                pushed = backbone.forward(pixels).float()
            finally:
                handle.remove()
        change = (pushed - clean).mean(0).numpy()
        names = self.class_names(change.size)
        order = np.argsort(-change, kind="stable")
        row = lambda i: {"index": int(i), "name": names[int(i)], "score": float(change[int(i)])}  # noqa: E731
        return {"top": [row(i) for i in order[:top]], "bottom": [row(i) for i in order[::-1][:top]]}
