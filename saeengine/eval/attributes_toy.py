"""A toy steerable generator with planted attribute directions: the known answer that
attribute discovery is tested on (and that ``saeengine attributes --toy`` demonstrates).

The "text encoder" maps a prompt to a fixed Gaussian embedding h [width] (seeded by the
prompt's SHA-256); steering adds alpha * direction to it, as the diffusion pipelines do at
their steered layer. The image [size, size, 3] is drawn in HSV from h and the seed:

- brightness along the unit direction u: a grey lift 0.5 sigmoid(g_b <h, u>) added to R, G
  and B (the colour below has value <= 0.45, so nothing clips);
- hue along the unit direction v: the hue is (prompt's base hue + g_h <h, v>) mod 1 turn,
  the base hue spread over the circle by the prompt's hash;
- a prompt-dependent texture: a sinusoidal grating whose angle and frequency follow two
  further unit directions w1, w2 (and the prompt's hash), with the seed's phase and pixel
  noise, modulating hue, saturation and value a little.

u, v, w1, w2 are orthonormal (QR of a seeded Gaussian). A direction of norm n moves
<h, u> by alpha * n * cos(direction, u): the planted latents (cos 1) move it by alpha * n,
a random direction by about alpha * n / sqrt(width) — which is why width defaults to 64
(random directions in 16 dimensions have |cos| ~ 0.25 with any axis, too close to the
planted effect to tell apart with 8 nulls; a real text encoder is 768 or more wide).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import InputError
from ._args import count

TOY_LATENTS = {0: "brightness", 1: "hue", 2: "random", 3: "random"}  # what each toy latent was planted as


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (hue in turns) -> RGB [..., 3] in [0, 1] (the standard hexcone formula)."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.empty(h.shape + (3,), dtype=np.float64)
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        out[mask] = np.stack([r[mask], g[mask], b[mask]], axis=-1)
    return out


def _prompt_numbers(prompt: str, width: int) -> tuple[np.ndarray, float, float]:
    """(embedding h [width] ~ N(0, I), base hue in [0, 1), base grating angle in [0, 1))."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.standard_normal(width), digest[8] / 256.0, digest[9] / 256.0


class ToyGenerator:
    """A :class:`saeengine.steer.SteerableGenerator` with planted directions (see the module
    docstring). ``brightness_direction`` (u) and ``hue_direction`` (v): unit [width] float32.

    width: the embedding width d; size: the image side; seed: draws u, v, w1, w2;
    brightness_gain g_b, hue_gain g_h: how strongly <h, u> and <h, v> act.
    """

    def __init__(self, width: int = 64, size: int = 32, seed: int = 0, *, brightness_gain: float = 0.5,
                 hue_gain: float = 0.06):
        self.width = count("width", width, 4)
        self.size = count("size", size, 8)
        basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((self.width, 4)))
        self._u, self._v, self._w1, self._w2 = basis.T
        self.brightness_gain, self.hue_gain = float(brightness_gain), float(hue_gain)
        side = (np.arange(self.size) + 0.5) / self.size
        self._y, self._x = np.meshgrid(side, side, indexing="ij")

    @property
    def brightness_direction(self) -> torch.Tensor:
        return torch.from_numpy(self._u.astype(np.float32))

    @property
    def hue_direction(self) -> torch.Tensor:
        return torch.from_numpy(self._v.astype(np.float32))

    def _image(self, h: np.ndarray, base_hue: float, base_angle: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(int(seed))
        phase, noise = rng.uniform(0, 2 * np.pi), rng.normal(0.0, 0.03, (self.size, self.size))
        angle = np.pi * base_angle + 0.25 * float(h @ self._w1)
        frequency = 2.0 + 3.0 / (1.0 + np.exp(-float(h @ self._w2)))
        along = self._x * np.cos(angle) + self._y * np.sin(angle)
        grating = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * along + phase)
        # brightness is a grey lift added to every channel: it leaves R - G and (R + G) / 2 - B,
        # and so the colourfulness, unchanged (a scaling of the value would move both alike)
        lift = 0.5 / (1.0 + np.exp(-self.brightness_gain * float(h @ self._u)))
        hue = base_hue + self.hue_gain * float(h @ self._v) + 0.04 * (grating - 0.5)
        saturation = np.clip(0.55 + 0.3 * (grating - 0.5), 0, 1)
        value = np.clip(0.35 * (0.75 + 0.25 * grating) + noise, 0, 1)
        rgb = np.clip(_hsv_to_rgb(hue, saturation, value) + lift, 0, 1)
        return np.round(255 * rgb).astype(np.uint8)

    def generate(self, prompts, seeds, direction: torch.Tensor | None = None, alpha: float = 0.0) -> np.ndarray:
        """uint8 [len(prompts), size, size, 3]; prompt i with seed seeds[i]; h' = h + alpha * direction."""
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise InputError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        step = None
        if direction is not None and alpha != 0:
            step = float(alpha) * torch.as_tensor(direction, dtype=torch.float32).detach().cpu().double().numpy()
            if step.shape != (self.width,):
                raise InputError(f"direction has shape {list(step.shape)}; the toy generator steers a "
                                 f"[{self.width}] embedding")
        out = np.empty((len(prompts), self.size, self.size, 3), dtype=np.uint8)
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            h, base_hue, base_angle = _prompt_numbers(str(prompt), self.width)
            out[i] = self._image(h if step is None else h + step, base_hue, base_angle, seed)
        return out


def toy_directions(generator: ToyGenerator, norm: float = 1.0, seed: int = 1) -> dict[int, torch.Tensor]:
    """The toy's four "latents" (TOY_LATENTS): 0 = norm * u (brightness), 1 = norm * v (hue),
    2 and 3 = random directions of the same norm (controls that must not be kept)."""
    gen = torch.Generator().manual_seed(seed)
    randoms = torch.randn(2, generator.width, generator=gen)
    randoms = randoms / randoms.norm(dim=1, keepdim=True)
    return {0: norm * generator.brightness_direction, 1: norm * generator.hue_direction,
            2: norm * randoms[0], 3: norm * randoms[1]}


TOY_PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn",
               "a portrait of an old man", "a city skyline", "a field of flowers", "a wooden chair",
               "a bird on a branch", "a plate of pasta", "a sailing boat", "a snowy forest")
