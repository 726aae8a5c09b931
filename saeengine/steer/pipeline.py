"""A diffusers Stable Diffusion / SDXL pipeline as a :class:`SteerableGenerator`: the prompt
embeddings are computed here, through the steering hooks, and handed to the pipeline.

    gen = load_generator("pipelines/sd15", layer=-2, steps=25)
    tokens = gen.layer_tokens(corpus)                      # [N, d]: train an SAE on these
    images = gen.generate(prompts, seeds, latent_direction(sae, 7, m7), alpha=4.0)

The embeddings, as the pipelines make them (checked against their own encode_prompt):
- Stable Diffusion: the text encoder's last hidden state (after its final LayerNorm);
- SDXL: each encoder's hidden_states[-2] (the penultimate block's output, no final
  LayerNorm), concatenated along the width (encoder 1 first), and the pooled, projected
  embedding of the second encoder (its last block, final LayerNorm and projection).

What a steered SDXL layer reaches: hidden_states[-2] is the output of block n - 2 (of n), so
a later block (layer -1) is after the token embedding. On text_encoder (no pooled output)
steering it changes nothing the UNet sees: refused (InputError). On text_encoder_2 it changes
only the pooled embedding (the last block feeds the final LayerNorm and the projection at
the end-of-text token), the token embedding not at all: allowed, with a UserWarning.
Stable Diffusion reads the last hidden state (after every block and the final LayerNorm):
every layer reaches the embedding.

CFG branches (``cfg``):
- "cond": only the conditional (prompt) embedding is steered;
- "both": the unconditional (negative prompt) embedding gets the same edit, +alpha [P];
- "opposite": the unconditional one gets -alpha, the variant of eval-learn's Concept
  Steerers implementation [S] (+direction conditional, -direction unconditional).
To first order (the UNet's noise prediction eps linear in the embedding, the same Jacobian J
in both branches), CFG's eps = (1 - g) eps_u + g eps_c moves by g alpha J d ("cond"),
alpha J d ("both": no CFG amplification) or (2g - 1) alpha J d ("opposite").
An SDXL pipeline with force_zeros_for_empty_prompt and no negative prompt uses zeros as the
unconditional embedding (no encoder pass): "both"/"opposite" then need negative_prompt="".
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..eval._args import count
from .generator import check_alpha, check_latent
from .hooks import WHERE, SteeringEdit, encoder_blocks, resolve_layer, steer_layer

CFG_MODES = ("cond", "both", "opposite")
ENCODERS = ("text_encoder", "text_encoder_2")
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass
class Embeddings:
    """What the pipeline is given: prompt_embeds [B, T, D] (SDXL: D = d_1 + d_2),
    negative_prompt_embeds [B, T, D] (None without CFG), and for SDXL pooled_prompt_embeds
    [B, p] and negative_pooled_prompt_embeds [B, p]."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def as_kwargs(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def _pipeline_kind(pipe) -> str:
    """ "sd" or "sdxl"; InputError for any other pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    raise InputError(f"{type(pipe).__name__} is not supported: steering takes a diffusers StableDiffusionPipeline "
                     "or StableDiffusionXLPipeline (a UNet conditioned on CLIP text encoders)")


class PipelineGenerator:
    """Steerable text-to-image generation with a Stable Diffusion or SDXL pipeline.

    Args:
        pipe: a StableDiffusionPipeline or StableDiffusionXLPipeline.
        layer: the steered block of the encoder (-2: the penultimate block's output).
            SDXL: -2 or earlier (a later block is after the embedding SDXL reads; see
            this module's docstring).
        encoder: which encoder :meth:`generate` steers: "text_encoder" or, in SDXL,
            "text_encoder_2"; ``width`` is its hidden size.
        where: "all" | "valid" | "active" (saeengine.steer.hooks).
        sae, latent: for where="active", the SAE (trained on this layer) and latent whose
            firing picks the positions (needed when a steered image is generated; set them
            later with :meth:`with_latent`).
        cfg: "cond" | "both" | "opposite" (this module's docstring).
        steps, guidance: denoising steps and the CFG scale (> 1 for CFG).
        size: image side in pixels (default: the pipeline's).
        negative_prompt: the unconditional prompt (default: the pipeline's: "" for SD, zeros
            for SDXL with force_zeros_for_empty_prompt).
        batch_size: images per pipeline call (results depend on it in the last bits).
    """

    def __init__(self, pipe, *, layer: int = -2, encoder: str = "text_encoder", where: str = "all", sae=None,
                 latent: int | None = None, cfg: str = "cond", steps: int = 25, guidance: float = 7.5,
                 size: int | None = None, negative_prompt: str | None = None, batch_size: int = 8,
                 progress: bool = False):
        self.pipe, self.kind = pipe, _pipeline_kind(pipe)
        self.encoders = {name: getattr(pipe, name, None) for name in ENCODERS}
        self.encoders = {name: model for name, model in self.encoders.items() if model is not None}
        if encoder not in self.encoders:
            raise InputError(f"encoder={encoder!r}: this pipeline's text encoders are {', '.join(self.encoders)}")
        if where not in WHERE:
            raise InputError(f"where={where!r}: choose one of {', '.join(WHERE)}")
        if cfg not in CFG_MODES:
            raise InputError(f"cfg={cfg!r}: choose one of {', '.join(CFG_MODES)}")
        self.encoder, self.where, self.cfg = encoder, where, cfg
        # only the steered encoder's range is checked here: SDXL's encoders differ in depth
        # (12 and 32 blocks), and an edit of the other one is checked when it is made
        resolve_layer(self.encoders[encoder], layer)
        self.layer = int(layer)
        self._check_reach(encoder)
        self.width = int(self.encoders[encoder].config.hidden_size)
        self.sae, self.latent = None, None
        self._set_sae(sae, latent)
        self.steps, self.batch_size = count("steps", steps), count("batch_size", batch_size)
        self.guidance = check_alpha(guidance)
        self.size = None if size is None else count("size", size, 8)
        self.negative_prompt = negative_prompt
        if cfg != "cond" and not self.do_cfg:
            raise InputError(f"cfg={cfg!r} steers the unconditional branch, but guidance={guidance} runs no CFG; "
                             "use a guidance > 1 or cfg='cond'")
        if cfg != "cond" and self._zero_negative:
            raise InputError(f"cfg={cfg!r}: this SDXL pipeline uses zeros as the unconditional embedding "
                             "(force_zeros_for_empty_prompt), which no encoder computes; pass negative_prompt='' "
                             "to encode the empty prompt instead, or use cfg='cond'")
        pipe.set_progress_bar_config(disable=not progress)

    # ----- facts ---------------------------------------------------------------------
    @property
    def do_cfg(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (as its own do_classifier_free_guidance)."""
        return self.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    @property
    def _zero_negative(self) -> bool:
        return (self.kind == "sdxl" and self.negative_prompt is None
                and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False)))

    def _set_sae(self, sae, latent) -> None:
        if sae is not None and int(sae.cfg.d_in) != self.width:
            raise InputError(f"the SAE reads width {sae.cfg.d_in} but {self.encoder} block {self.layer} has width "
                             f"{self.width}; train the SAE on this encoder's layer (PipelineGenerator.layer_tokens)")
        if sae is not None and latent is not None:
            latent = check_latent(sae, latent)
        self.sae, self.latent = sae, latent

    def with_latent(self, latent: int | None, sae=None) -> "PipelineGenerator":
        """A copy (sharing the pipeline) whose where="active" positions follow ``latent`` of
        ``sae`` (default: this generator's SAE): the sweep steers each latent where it fires."""
        other = copy.copy(self)
        other._set_sae(sae if sae is not None else self.sae, latent)
        return other

    def _check_reach(self, name: str) -> None:
        """Whether steering ``layer`` of encoder ``name`` reaches what the pipeline reads
        (this module's docstring): InputError for an SDXL layer after the token embedding's
        block on an encoder without a pooled output, a UserWarning on the pooled encoder."""
        model = self.encoders[name]
        index = resolve_layer(model, self.layer)
        n = len(encoder_blocks(model))
        read = n - 2  # hidden_states[-2]: hidden_states[0] is the embedding layer, [i + 1] block i
        if self.kind != "sdxl" or index <= read:
            return
        where = f"layer={self.layer} (block {index} of {name}'s blocks 0 .. {n - 1})"
        fix = f"use --layer -2 or earlier (block {read}, or any block before it)"
        if not hasattr(model, "text_projection"):  # no pooled output: nothing downstream of the block
            raise InputError(f"{where} comes after block {read}, whose output (hidden_states[-2]) SDXL reads as "
                             f"{name}'s prompt embedding: steering it changes nothing the UNet sees, and every "
                             f"image would equal the unsteered one; {fix}")
        warnings.warn(f"{where} comes after block {read}, whose output (hidden_states[-2]) SDXL reads as {name}'s "
                      "token embedding: steering it leaves the token embedding unchanged and moves only the pooled "
                      "embedding (final LayerNorm and projection at the end-of-text token; where='active'/'valid' "
                      f"reach it only when that token is edited); to steer the token embedding, {fix}",
                      UserWarning, stacklevel=3)

    def widths(self) -> dict[str, int]:
        """{encoder name: its hidden size} (SDXL's two encoders differ)."""
        return {name: int(model.config.hidden_size) for name, model in self.encoders.items()}

    def _tokenize(self, name: str, prompts: list[str]) -> dict:
        tokenizer = getattr(self.pipe, _TOKENIZERS[name])
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")

    # ----- encoding --------------------------------------------------------------------
    def _check_edits(self, edits: dict | None) -> dict:
        edits = {name: e for name, e in (edits or {}).items() if e is not None}
        for name, edit in edits.items():
            if name not in self.encoders:
                raise InputError(f"an edit for {name!r}: this pipeline's text encoders are {', '.join(self.encoders)}")
            self._check_reach(name)
            if edit.width != self.widths()[name]:
                raise InputError(f"the direction for {name} has width {edit.width} but {name} block {self.layer} "
                                 f"has width {self.widths()[name]}; use an SAE trained on that encoder and layer")
        return edits

    @torch.no_grad()
    def _encode_branch(self, prompts: list[str], edits: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One branch (conditional or unconditional): (embeds [B, T, D], pooled [B, p] | None)."""
        parts, pooled = [], None
        for name, model in self.encoders.items():
            inputs = self._tokenize(name, prompts)
            device = next(model.parameters()).device
            ids = inputs["input_ids"].to(device)
            # an encoder without an edit runs as it is (no hook: its depth may not have this layer)
            hooked = steer_layer(model, self.layer, edits[name], token_mask=inputs["attention_mask"]) \
                if name in edits else nullcontext()
            with hooked:
                if self.kind == "sd":
                    use_mask = getattr(model.config, "use_attention_mask", False)
                    mask = inputs["attention_mask"].to(device) if use_mask else None
                    parts.append(model(ids, attention_mask=mask)[0])
                else:
                    out = model(ids, output_hidden_states=True)
                    if pooled is None and out[0].ndim == 2:  # the projected encoder's text_embeds
                        pooled = out[0]
                    parts.append(out.hidden_states[-2])
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], pooled

    def encode(self, prompts: list[str], edits: dict[str, SteeringEdit] | None = None) -> Embeddings:
        """The embeddings the pipeline gets for ``prompts``, each encoder named in ``edits``
        ({"text_encoder": edit, "text_encoder_2": edit}) steered at ``layer``; the
        unconditional branch as ``cfg`` says."""
        edits = self._check_edits(edits)
        dtype = (self.encoders.get("text_encoder_2") or self.encoders["text_encoder"]).dtype
        device = self.pipe._execution_device
        embeds, pooled = self._encode_branch(prompts, edits)
        result = Embeddings(embeds.to(device=device, dtype=dtype))
        if self.kind == "sdxl":
            result.pooled_prompt_embeds = pooled.to(device)
        if not self.do_cfg:
            return result
        if self._zero_negative:
            result.negative_prompt_embeds = torch.zeros_like(result.prompt_embeds)
            result.negative_pooled_prompt_embeds = torch.zeros_like(result.pooled_prompt_embeds)
            return result
        uncond_edits = {} if self.cfg == "cond" else \
            edits if self.cfg == "both" else {name: e.negated() for name, e in edits.items()}
        negative = [self.negative_prompt or ""] * len(prompts)
        n_embeds, n_pooled = self._encode_branch(negative, uncond_edits)
        result.negative_prompt_embeds = n_embeds.to(device=device, dtype=dtype)
        if self.kind == "sdxl":
            result.negative_pooled_prompt_embeds = n_pooled.to(device)
        return result

    # ----- generation ------------------------------------------------------------------
    def edit(self, direction: torch.Tensor | None, alpha: float) -> SteeringEdit | None:
        """The SteeringEdit of :meth:`generate`'s direction and alpha on ``encoder`` (None when
        there is nothing to add: no direction, or alpha = 0)."""
        alpha = check_alpha(alpha)
        if direction is None or alpha == 0.0:
            return None
        direction = torch.as_tensor(direction)
        if direction.shape != (self.width,):
            raise InputError(f"direction has shape {tuple(direction.shape)} but {self.encoder} block {self.layer} "
                             f"has width {self.width}: pass a [{self.width}] direction (an SAE of this layer)")
        return SteeringEdit(direction.float(), alpha, self.where, self.sae, self.latent)

    def generate(self, prompts: list[str], seeds: list[int], direction: torch.Tensor | None = None,
                 alpha: float = 0.0) -> np.ndarray:
        """uint8 [len(prompts), H, W, 3]; prompt i with seed seeds[i] (its own torch.Generator,
        so an image depends on its seed alone); h' = h + alpha * direction on ``encoder``."""
        edit = self.edit(direction, alpha)
        return self.generate_edits(prompts, seeds, {self.encoder: edit} if edit is not None else None)

    @torch.no_grad()
    def generate_edits(self, prompts: list[str], seeds: list[int],
                       edits: dict[str, SteeringEdit] | None = None) -> np.ndarray:
        """:meth:`generate` with an edit per encoder (SDXL: steer either or both)."""
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if not prompts or len(prompts) != len(seeds):
            raise InputError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt (at least one)")
        if not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be strings")
        device = self.pipe._execution_device
        size = {} if self.size is None else {"height": self.size, "width": self.size}
        out = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            embeds = self.encode(batch, edits)
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds[start:start + len(batch)]]
            images = self.pipe(**embeds.as_kwargs(), num_inference_steps=self.steps, guidance_scale=self.guidance,
                               generator=generators, output_type="np", **size).images
            out.append(np.asarray(images))
        # as diffusers' numpy_to_pil: round(x * 255) of the [0, 1] decoded images
        return (np.concatenate(out) * 255).round().clip(0, 255).astype(np.uint8)

    # ----- recording --------------------------------------------------------------------
    @torch.no_grad()
    def layer_tokens(self, prompts: list[str], encoder: str | None = None, batch_size: int = 64) -> torch.Tensor:
        """[N, d] float32 (CPU): the steered block's output on the prompts' valid (non-pad)
        tokens, prompt by prompt in order, for training an SAE and for m_j."""
        name = encoder or self.encoder
        if name not in self.encoders:
            raise InputError(f"encoder={name!r}: this pipeline's text encoders are {', '.join(self.encoders)}")
        prompts = list(prompts)
        if not prompts:
            raise InputError("no prompts to record: give at least one")
        model, out = self.encoders[name], []
        for start in range(0, len(prompts), batch_size):
            inputs = self._tokenize(name, prompts[start:start + batch_size])
            captured: list = []
            with steer_layer(model, self.layer, None, capture=captured):
                model(inputs["input_ids"].to(next(model.parameters()).device))
            valid = inputs["attention_mask"].bool()
            out.append(captured[0].float().cpu()[valid])
        return torch.cat(out)


def _check_pipeline_folder(folder: Path, encoder: str) -> dict:
    """model_index.json of a diffusers pipeline folder with a text encoder; InputError otherwise."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: pass a local diffusers pipeline folder (save_pretrained)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise InputError(f"{folder} is not a diffusers pipeline folder (no model_index.json): pass the folder "
                         "that pipe.save_pretrained wrote")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{index_file} is not readable JSON ({exc}); re-save the pipeline") from None
    present = [name for name in ENCODERS if isinstance(index.get(name), list) and index[name][0] is not None
               and (folder / name).is_dir()]
    if not present:
        raise InputError(f"{folder} has no text encoder (model_index.json and the folder name neither text_encoder "
                         "nor text_encoder_2): steering edits a CLIP text encoder; pass a Stable Diffusion or SDXL "
                         "pipeline folder")
    if encoder not in present:
        raise InputError(f"encoder={encoder!r}: {folder} has {', '.join(present)}")
    for name in ("unet", "vae", "scheduler", *(_TOKENIZERS[e] for e in present)):
        if not (folder / name).is_dir():
            raise InputError(f"{folder} has no {name}/ folder: steering needs a text-to-image pipeline with a UNet, "
                             "a VAE, a scheduler and a tokenizer per text encoder")
    return index


def load_generator(pipeline_dir, *, layer: int = -2, encoder: str = "text_encoder", steps: int = 25,
                   guidance: float = 7.5, size: int | None = None, cfg: str = "cond", where: str = "all",
                   device=None, sae=None, latent: int | None = None, negative_prompt: str | None = None,
                   dtype: torch.dtype | None = None, batch_size: int = 8, progress: bool = False) -> PipelineGenerator:
    """A :class:`PipelineGenerator` over the local pipeline folder ``pipeline_dir`` (SDXL when
    it has text_encoder_2, Stable Diffusion otherwise); nothing is downloaded.

    InputError: not a folder, not a diffusers pipeline, no text encoder, no UNet/VAE/
    scheduler/tokenizer, and the PipelineGenerator's own checks.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(pipeline_dir)
    index = _check_pipeline_folder(folder, encoder)
    sdxl = "text_encoder_2" in index and (folder / "text_encoder_2").is_dir()
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, **extra)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{folder} does not load as a {cls.__name__} ({type(exc).__name__}: {exc}); pass a complete "
                         "local pipeline folder") from None
    if device is not None:
        pipe = pipe.to(device)
    if sae is not None and device is not None:
        sae = sae.to(device)
    return PipelineGenerator(pipe, layer=layer, encoder=encoder, where=where, sae=sae, latent=latent, cfg=cfg,
                             steps=steps, guidance=guidance, size=size, negative_prompt=negative_prompt,
                             batch_size=batch_size, progress=progress)
