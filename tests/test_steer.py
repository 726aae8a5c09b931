"""Steering diffusion through the text encoder (saeengine.steer, ``saeengine steer``) on
tiny random-initialized Stable Diffusion and SDXL pipelines (tests/tiny_diffusion.py).

The oracles are independent of the code under test: diffusers' own pipeline call and
encode_prompt (alpha = 0, the embeddings), transformers' own output_hidden_states record of
the steered block, a forward pre-hook on the next block (the rest of the encoder continuing
from the edited value), a brute-force ReLU of the latent's pre-activation (where="active"),
the decoder's own output (latent_direction), and a toy generator with known pixel shifts.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from tiny_diffusion import save_pipeline, tiny_clip, tiny_sd, tiny_sdxl

from saeengine import SAE, SAEConfig
from saeengine.cli import main
from saeengine.errors import InputError
from saeengine.steer import latent_direction
from saeengine.steer.hooks import SteeringEdit, steer_layer
from saeengine.steer.pipeline import PipelineGenerator, load_generator

PROMPTS = ["a cat", "the red dog on the mat"]
SEEDS = [3, 11]
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def _generator(pipe, **kw):
    kw = {"steps": STEPS, "size": 32, **kw}
    return PipelineGenerator(pipe, **kw)


def _reference(pipe, guidance: float = 7.5) -> np.ndarray:
    """diffusers' own call on the prompts, one torch.Generator per image, as uint8."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, height=32, width=32,
                  generator=gens, output_type="np").images
    return (images * 255).round().astype(np.uint8)


def _direction(width: int, seed: int = 0, norm: float = 3.0) -> torch.Tensor:
    d = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return norm * d / d.norm()


def _ids(pipe, name: str = "tokenizer"):
    tok = getattr(pipe, name)
    return tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")


@torch.no_grad()
def _hidden_states(encoder, ids, layer, edit=None, token_mask=None):
    """transformers' own record of block ``layer``'s output (hidden_states[i + 1])."""
    index = layer % len(encoder.encoder.layers)
    with steer_layer(encoder, layer, edit, token_mask=token_mask):
        out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[index + 1], out[0]


# ----- alpha = 0 and the embeddings ------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_alpha_zero_reproduces_the_pipeline_bit_for_bit(kind, sd, sdxl):
    pipe = sd if kind == "sd" else sdxl
    gen = _generator(pipe)
    plain = gen.generate(PROMPTS, SEEDS)
    assert plain.dtype == np.uint8 and plain.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(plain, _reference(pipe))
    direction = _direction(gen.width)
    np.testing.assert_array_equal(gen.generate(PROMPTS, SEEDS, direction, 0.0), plain)
    np.testing.assert_array_equal(gen.generate(PROMPTS, SEEDS, None, 5.0), plain)
    steered = gen.generate(PROMPTS, SEEDS, direction, 4.0)
    assert np.abs(steered.astype(int) - plain).mean() > 0.5  # steering does change the images
    assert not np.array_equal(gen.generate(PROMPTS, SEEDS[::-1]), plain)  # the seeds matter


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unsteered_embeddings_equal_the_pipelines_encode_prompt(kind, sd, sdxl):
    pipe = sd if kind == "sd" else sdxl
    ours = _generator(pipe, negative_prompt="" if kind == "sdxl" else None).encode(PROMPTS)
    if kind == "sd":
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    else:
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True, negative_prompt=["", ""])
        assert torch.equal(ours.pooled_prompt_embeds, pp) and torch.equal(ours.negative_pooled_prompt_embeds, npp)
    assert torch.equal(ours.prompt_embeds, pe) and torch.equal(ours.negative_prompt_embeds, ne)


# ----- the hooked layer --------------------------------------------------------------------
@pytest.mark.parametrize("layer", [-2, 0])
def test_projection_on_the_direction_is_linear_in_alpha_at_the_hooked_layer(sd, layer):
    enc, ids = sd.text_encoder, _ids(sd)["input_ids"]
    d = _direction(32, seed=1)
    unit = d / d.norm()
    h0, _ = _hidden_states(enc, ids, layer)
    for alpha in (-3.0, -0.5, 1.0, 2.5, 8.0):
        h, _ = _hidden_states(enc, ids, layer, SteeringEdit(d, alpha))
        delta = (h - h0).double()
        proj = delta @ unit.double()
        torch.testing.assert_close(proj, torch.full_like(proj, alpha * float(d.norm())), atol=1e-5, rtol=1e-5)
        orth = delta - proj[..., None] * unit.double()
        assert float(orth.abs().max()) < 1e-5  # nothing but the direction was added


@pytest.mark.parametrize("layer", [-3, -2, -1])
@torch.no_grad()
def test_the_rest_of_the_encoder_continues_from_the_edited_value(sd, layer):
    """Oracle: the same alpha * d added to the next module's input by a pre-hook."""
    enc, ids = sd.text_encoder, _ids(sd)["input_ids"]
    d, alpha = _direction(32, seed=2), 1.7
    with steer_layer(enc, layer, SteeringEdit(d, alpha)):
        ours = enc(ids)[0]
    index = layer % len(enc.encoder.layers)
    nxt = enc.encoder.layers[index + 1] if index + 1 < len(enc.encoder.layers) else enc.final_layer_norm
    handle = nxt.register_forward_pre_hook(lambda m, args: (args[0] + alpha * d, *args[1:]))
    try:
        oracle = enc(ids)[0]
    finally:
        handle.remove()
    torch.testing.assert_close(ours, oracle, atol=1e-5, rtol=1e-5)
    assert float((ours - enc(ids)[0]).abs().max()) > 1e-3


def _firing_sae(hidden: torch.Tensor, latent: int = 2) -> SAE:
    """A ReLU SAE (no normalization, b_dec = 0) whose latent fires on about half the positions:
    z = relu(h . w + b) with b the negated median of h . w."""
    sae = SAE(SAEConfig(d_in=hidden.shape[-1], d_sae=6, architecture="relu", normalization="none"), seed=0)
    with torch.no_grad():
        sae.b_dec.zero_()
        pre = hidden.reshape(-1, hidden.shape[-1]) @ sae.W_enc[latent]
        sae.b_enc[latent] = -pre.median() + 1e-4
    return sae.eval()


def test_where_active_edits_only_where_the_latent_fires(sd):
    enc, ids = sd.text_encoder, _ids(sd)["input_ids"]
    h0, _ = _hidden_states(enc, ids, -2)
    sae, latent = _firing_sae(h0), 2
    fires = (h0 @ sae.W_enc[latent].detach() + sae.b_enc[latent].detach()) > 0  # brute force
    assert 0 < int(fires.sum()) < fires.numel()
    d = _direction(32, seed=3)
    h, _ = _hidden_states(enc, ids, -2, SteeringEdit(d, 2.0, "active", sae, latent))
    changed = (h - h0).abs().amax(-1) > 0
    assert torch.equal(changed, fires)
    torch.testing.assert_close((h - h0)[fires], (2.0 * d).expand(int(fires.sum()), -1), atol=1e-5, rtol=1e-5)


def test_where_valid_edits_the_prompt_tokens_only(sd):
    inputs = _ids(sd)
    mask = inputs["attention_mask"].bool()
    assert not bool(mask.all())  # the prompts are padded
    h0, _ = _hidden_states(sd.text_encoder, inputs["input_ids"], -2)
    h, _ = _hidden_states(sd.text_encoder, inputs["input_ids"], -2, SteeringEdit(_direction(32), 1.0, "valid"),
                          token_mask=inputs["attention_mask"])
    assert torch.equal((h - h0).abs().amax(-1) > 0, mask)
    h_all, _ = _hidden_states(sd.text_encoder, inputs["input_ids"], -2, SteeringEdit(_direction(32), 1.0, "all"))
    assert bool(((h_all - h0).abs().amax(-1) > 0).all())


# ----- CFG branches ------------------------------------------------------------------------
def test_cfg_cond_both_and_opposite_steer_the_branches_as_specified(sd):
    d, alpha = _direction(32, seed=4), 3.0
    edit = {"text_encoder": SteeringEdit(d, alpha)}
    plain = _generator(sd).encode(PROMPTS)
    cond = _generator(sd, cfg="cond").encode(PROMPTS, edit)
    both = _generator(sd, cfg="both").encode(PROMPTS, edit)
    opposite = _generator(sd, cfg="opposite").encode(PROMPTS, edit)
    empty = ["", ""]
    steered_empty = _generator(sd).encode(empty, edit).prompt_embeds
    negated_empty = _generator(sd).encode(empty, {"text_encoder": SteeringEdit(d, -alpha)}).prompt_embeds
    for e in (cond, both, opposite):
        assert torch.equal(e.prompt_embeds, cond.prompt_embeds)
        assert not torch.equal(e.prompt_embeds, plain.prompt_embeds)
    assert torch.equal(cond.negative_prompt_embeds, plain.negative_prompt_embeds)
    assert torch.equal(both.negative_prompt_embeds, steered_empty)
    assert torch.equal(opposite.negative_prompt_embeds, negated_empty)
    assert not torch.equal(both.negative_prompt_embeds, plain.negative_prompt_embeds)
    images = {cfg: _generator(sd, cfg=cfg).generate(PROMPTS, SEEDS, d, alpha) for cfg in ("cond", "both")}
    assert not np.array_equal(images["cond"], images["both"])


def test_cfg_of_the_unconditional_branch_needs_one(sd, sdxl):
    with pytest.raises(InputError, match="no CFG"):
        _generator(sd, cfg="both", guidance=1.0)
    with pytest.raises(InputError, match="force_zeros_for_empty_prompt"):
        _generator(sdxl, cfg="both")
    _generator(sdxl, cfg="both", negative_prompt="")  # the empty prompt through the encoders


# ----- SDXL: two encoders, each steered on its own --------------------------------------
def test_sdxl_encoders_are_steered_independently(sdxl):
    gen = _generator(sdxl, negative_prompt="", cfg="both")
    assert gen.widths() == {"text_encoder": 32, "text_encoder_2": 48}
    d1, d2 = _direction(32, seed=5), _direction(48, seed=6)
    e1, e2 = {"text_encoder": SteeringEdit(d1, 2.0)}, {"text_encoder_2": SteeringEdit(d2, 2.0)}
    plain, only1, only2 = gen.encode(PROMPTS), gen.encode(PROMPTS, e1), gen.encode(PROMPTS, e2)
    both = gen.encode(PROMPTS, {**e1, **e2})
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        p, a, b, ab = (getattr(e, key) for e in (plain, only1, only2, both))
        assert torch.equal(a[..., 32:], p[..., 32:]) and not torch.equal(a[..., :32], p[..., :32])
        assert torch.equal(b[..., :32], p[..., :32]) and not torch.equal(b[..., 32:], p[..., 32:])
        assert torch.equal(ab[..., :32], a[..., :32]) and torch.equal(ab[..., 32:], b[..., 32:])
        # layer -2 is SDXL's embedding itself (hidden_states[-2]): the step is exactly alpha * d
        torch.testing.assert_close(a[..., :32] - p[..., :32], (2.0 * d1).expand_as(p[..., :32]), atol=1e-5, rtol=0)
        torch.testing.assert_close(b[..., 32:] - p[..., 32:], (2.0 * d2).expand_as(p[..., 32:]), atol=1e-5, rtol=0)
    # the pooled embedding comes from encoder 2 (its last block, after the steered one)
    assert torch.equal(only1.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    assert not torch.equal(only2.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    with pytest.raises(InputError, match="width"):
        gen.encode(PROMPTS, {"text_encoder": SteeringEdit(d2, 1.0)})
    gen2 = _generator(sdxl, encoder="text_encoder_2")
    assert gen2.width == 48
    images = gen2.generate(PROMPTS, SEEDS, d2, 3.0)
    assert not np.array_equal(images, gen2.generate(PROMPTS, SEEDS))


def test_sdxl_refuses_a_layer_after_the_embedding_it_reads(sdxl):
    """SDXL reads hidden_states[-2]: a hook on the last block of text_encoder is invisible to
    the UNet (refused); on text_encoder_2 it moves only the pooled embedding (a warning)."""
    d1, d2 = _direction(32, seed=7), _direction(48, seed=8)
    # the trap itself, seen by transformers' own record: the last block's edit leaves hidden_states[-2] as is
    ids = _ids(sdxl)["input_ids"]
    with torch.no_grad():
        plain = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        with steer_layer(sdxl.text_encoder, -1, SteeringEdit(d1, 3.0)):
            steered = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(steered, plain)
    for layer in (-1, 2):  # the last of the 3 blocks, from the end and from the start
        with pytest.raises(InputError, match=rf"layer={layer} .*hidden_states\[-2\].*use --layer -2 or earlier"):
            _generator(sdxl, layer=layer)
    with pytest.warns(UserWarning, match="only the pooled embedding"):
        gen2 = _generator(sdxl, layer=-1, encoder="text_encoder_2")
    base = gen2.encode(PROMPTS)
    with pytest.warns(UserWarning, match="only the pooled embedding"):
        moved = gen2.encode(PROMPTS, {"text_encoder_2": SteeringEdit(d2, 3.0)})
    assert torch.equal(moved.prompt_embeds, base.prompt_embeds)  # the token embedding, bit for bit
    assert float((moved.pooled_prompt_embeds - base.pooled_prompt_embeds).abs().max()) > 1e-3
    # an edit of text_encoder through generate_edits is checked too
    with pytest.raises(InputError, match="use --layer -2 or earlier"):
        gen2.encode(PROMPTS, {"text_encoder": SteeringEdit(d1, 3.0)})
    # layer -2 (SDXL's own embedding) and earlier do change the token embeds
    for layer in (-2, -3):
        gen = _generator(sdxl, layer=layer)
        plain, steered = gen.encode(PROMPTS), gen.encode(PROMPTS, {"text_encoder": SteeringEdit(d1, 3.0)})
        assert float((steered.prompt_embeds[..., :32] - plain.prompt_embeds[..., :32]).abs().max()) > 1e-3


def test_sd_last_layer_reaches_the_embedding(sd):
    """Stable Diffusion reads the last hidden state, after the final LayerNorm: layer -1 counts.
    Oracle: the final LayerNorm of transformers' record of the last block plus alpha * d."""
    d, alpha = _direction(32, seed=9), 2.0
    gen = _generator(sd, layer=-1)
    steered = gen.encode(PROMPTS, {"text_encoder": SteeringEdit(d, alpha)}).prompt_embeds
    with torch.no_grad():
        last = sd.text_encoder(_ids(sd)["input_ids"], output_hidden_states=True).hidden_states[-1]
        oracle = sd.text_encoder.text_model.final_layer_norm(last + alpha * d) \
            if hasattr(sd.text_encoder, "text_model") else sd.text_encoder.final_layer_norm(last + alpha * d)
    torch.testing.assert_close(steered, oracle, atol=1e-5, rtol=1e-5)
    assert float((steered - gen.encode(PROMPTS).prompt_embeds).abs().max()) > 1e-2


# ----- a planted direction: recovered, and steering along it raises a readout (spec §2.8) -----
class _Planted(torch.nn.Module):
    """A text-encoder block whose output gets a planted sparse component: strength * mag_t * u
    on about a fifth of the positions, picked (and mag_t in 0.25 .. 1.75 chosen) by a hash of
    the whole prompt's ids and the position, so independent of the token at that position."""

    def __init__(self, block, u: torch.Tensor, strength: float):
        super().__init__()
        self.block, self.u, self.strength, self.ids = block, u, strength, None

    @staticmethod
    def positions(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> (planted [B, T] bool, mag [B, T] float32)."""
        pos = torch.arange(ids.shape[1])
        key = (ids * (pos + 1)).sum(1, keepdim=True) * 7 + 13 * pos
        return key % 5 == 0, 0.25 + (key % 7).float() / 4

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        planted, mag = self.positions(self.ids)
        hidden = hidden + (self.strength * mag * planted)[..., None] * self.u
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def test_a_planted_direction_is_recovered_and_steering_along_it_raises_a_readout(sd):
    import copy
    import random

    from diffusers import StableDiffusionPipeline
    from sklearn.linear_model import LogisticRegression

    from saeengine.steer.hooks import encoder_blocks
    from saeengine.steer.train import train_prompt_sae

    enc = copy.deepcopy(sd.text_encoder)  # the module fixture stays as it is
    blocks = encoder_blocks(enc)
    u = _direction(32, seed=10, norm=1.0)
    planted = _Planted(blocks[-2], u, strength=0.0)
    blocks[-2] = planted

    def grab_ids(module, args, kwargs):
        planted.ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    enc.register_forward_pre_hook(grab_ids, with_kwargs=True)
    gen = PipelineGenerator(StableDiffusionPipeline(**{**sd.components, "text_encoder": enc}), layer=-2,
                            steps=STEPS, size=32)
    rng = random.Random(0)
    words = ["cat", "dog", "mat", "red", "the", "a", "on", "tree", "car", "man", "sky", "blue", "big"]
    corpus = [" ".join(rng.sample(words, rng.randint(2, 4))) for _ in range(48)]
    planted.strength = 3.0 * float(gen.layer_tokens(corpus).norm(dim=1).mean())  # 3 x the tokens' mean norm

    # recovered: a decoder row, in raw space, along u (a random direction in 32-d: |cos| ~ 0.18 by chance)
    fit = train_prompt_sae(gen, corpus, d_sae=16, k=1, epochs=150, seed=0)
    rows = torch.stack([latent_direction(fit.sae, j, 1.0) for j in range(16)])
    cos = rows @ u / rows.norm(dim=1)
    j = int(cos.argmax())
    assert float(cos[j]) > 0.9, cos
    direction = latent_direction(fit.sae, j, float(fit.maxima[j]))

    # readout at the final embedding: a logistic probe (scikit-learn) for "planted here", fitted
    # on the unsteered corpus's valid tokens
    tok = sd.tokenizer
    inputs = tok(corpus, padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="pt")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        final = enc(inputs["input_ids"])[0]
    labels = _Planted.positions(inputs["input_ids"])[0][valid].numpy()
    probe = LogisticRegression(max_iter=2000).fit(final[valid].numpy(), labels)
    assert probe.score(final[valid].numpy(), labels) > 0.95

    prompts = ["a cat on the mat", "the red car", "a big blue sky"]
    mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")["attention_mask"].bool()
    seen: list = []  # the steered block's output after the edit (steer_layer's hook runs first)
    handle = planted.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o)))
    layer_readout, logits = {}, {}
    try:
        for alpha in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0):
            seen.clear()
            embeds = gen.encode(prompts, {"text_encoder": gen.edit(direction, alpha)} if alpha else None)
            layer_readout[alpha] = float((seen[0][mask] @ u).mean())
            logits[alpha] = float(probe.decision_function(embeds.prompt_embeds[mask].numpy()).mean())
    finally:
        handle.remove()
    # at the steered layer: the projection on u rises by alpha * (m_j d_j . u), monotone in alpha
    for alpha in (1.0, 2.0, 4.0):
        assert math.isclose(layer_readout[alpha] - layer_readout[0.0], alpha * float(direction @ u), rel_tol=1e-4)
    assert layer_readout[0.0] < layer_readout[1.0] < layer_readout[2.0] < layer_readout[4.0]
    # at the embedding: the probe's logit rises monotonically up to alpha = 1 (m_j, the latent's
    # largest firing) and beyond it stays on the planted side (the final LayerNorm saturates it)
    assert logits[0.0] < 0 and logits[0.0] < logits[0.25] < logits[0.5] < logits[1.0], logits
    assert min(logits[2.0], logits[4.0]) > 0, logits


# ----- recording, directions, the SAE -------------------------------------------------------
def test_layer_tokens_are_the_valid_tokens_of_the_block(sd):
    from saeengine.backbones import TextEncoderBackbone

    tokens = _generator(sd).layer_tokens(PROMPTS)
    backbone = TextEncoderBackbone(sd.text_encoder, sd.tokenizer)  # the recording backbone (attention mask on)
    inputs = backbone.preprocess(PROMPTS)
    seen = []
    handle = backbone.layer_module("blocks.-2").register_forward_hook(
        lambda m, i, o: seen.append(backbone.to_tokens(o)))
    try:
        with torch.no_grad():
            backbone.forward(inputs)
    finally:
        handle.remove()
    oracle = seen[0][inputs["attention_mask"].bool()]
    assert tokens.shape == (int(inputs["attention_mask"].sum()), 32) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, oracle, atol=1e-5, rtol=1e-5)


def test_latent_direction_is_what_decoding_m_units_of_the_latent_adds():
    from saeengine.architectures import DenseCode

    sae = SAE(SAEConfig(d_in=12, d_sae=20, k=3, normalization="mean_norm"), seed=1)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0)) * 4 + 1
    sae.fit_normalization(x)
    z = torch.zeros(2, 20)
    z[1, 7] = 2.5
    decoded = sae.decode(DenseCode(z))
    torch.testing.assert_close(latent_direction(sae, 7, 2.5), (decoded[1] - decoded[0]).detach(), atol=1e-5,
                               rtol=1e-5)
    assert math.isclose(float(latent_direction(sae, 7, 2.5).norm()), 2.5 * float(sae.norm_scale), rel_tol=1e-5)
    for bad in (20, -1, 2.0):
        with pytest.raises(InputError, match="out of range"):
            latent_direction(sae, bad, 1.0)
    with pytest.raises(InputError, match="not finite"):
        latent_direction(sae, 3, float("nan"))


def test_train_prompt_sae_takes_each_latents_max_over_the_corpus(sd):
    from saeengine.eval.batch import code_pairs
    from saeengine.steer.train import train_prompt_sae

    gen = _generator(sd)
    corpus = ["a cat", "the dog", "a red cat on the mat", "the dog and the cat", "red", "on the mat"] * 2
    fit = train_prompt_sae(gen, corpus, d_sae=24, k=3, epochs=3)
    tokens = gen.layer_tokens(corpus)
    values, indices = code_pairs(fit.sae.encode(tokens))
    dense = torch.zeros(tokens.shape[0], 24).scatter_(1, indices, values)  # brute force over the tokens
    torch.testing.assert_close(fit.maxima, dense.max(0).values.clamp_min(0), atol=1e-6, rtol=1e-6)
    assert fit.n_tokens == tokens.shape[0] and fit.sae.cfg.d_in == 32


# ----- the sweep's bookkeeping ------------------------------------------------------------
class _ToyGenerator:
    """Grey images whose level is 100 + alpha * (direction . u): the pixel distance to the
    alpha = 0 image is |alpha * direction . u| / 255 exactly."""

    width = 4

    def __init__(self):
        self.u = torch.tensor([1.0, 0.0, 0.0, 0.0])

    def generate(self, prompts, seeds, direction=None, alpha=0.0):
        shift = 0.0 if direction is None else float(alpha) * float(direction @ self.u)
        return np.full((len(prompts), 8, 8, 3), 100 + shift, dtype=np.float64).round().astype(np.uint8)


def test_alpha_sweep_measures_against_the_unsteered_image(tmp_path):
    from PIL import Image

    from saeengine.steer.sweep import alpha_sweep, write_sweep

    directions = {5: torch.tensor([10.0, 3.0, 0.0, 0.0]), 9: torch.tensor([0.0, 1.0, 0.0, 0.0])}
    result = alpha_sweep(_ToyGenerator(), directions, ["x", "y", "z"], alphas=[2, -1, 4], classifier=None,
                         progress=False)
    assert result.alphas == [-1.0, 0.0, 2.0, 4.0] and result.seeds == [0, 1, 2]
    mae = [row["pixel_mae"] for row in result.metrics[5]]
    np.testing.assert_allclose(mae, [10 / 255, 0.0, 20 / 255, 40 / 255])
    assert [row["pixel_mae"] for row in result.metrics[9]] == [0.0] * 4  # orthogonal to what the toy renders
    assert result.images[5].shape == (4, 3, 8, 8, 3)
    paths = write_sweep(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "saeengine-steer" and [e["latent"] for e in data["latents"]] == [5, 9]
    grid = Image.open(paths["grid_5"])
    assert grid.size[0] > grid.size[1]  # 4 columns (alphas) x 3 rows (prompts)
    assert paths["report"].read_text().count("data:image/png;base64,") == 4
    with pytest.raises(InputError, match="not finite"):
        alpha_sweep(_ToyGenerator(), directions, ["x"], alphas=[float("inf")], classifier=None, progress=False)
    with pytest.raises(InputError, match="width"):
        alpha_sweep(_ToyGenerator(), {1: torch.ones(5)}, ["x"], classifier=None, progress=False)


def test_class_shift_kl_matches_a_direct_sum():
    from scipy.stats import entropy

    from saeengine.steer.metrics import class_shift

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 10))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = class_shift(log_p[1], log_p[0])
    np.testing.assert_allclose(out["kl"], [entropy(np.exp(log_p[0, i]), np.exp(log_p[1, i])) for i in range(3)])
    np.testing.assert_array_equal(out["top1_change"], (logits[0].argmax(1) != logits[1].argmax(1)).astype(float))


# ----- bad input --------------------------------------------------------------------------
def test_bad_inputs_raise_input_errors(sd, tmp_path):
    gen = _generator(sd)
    for alpha in (float("inf"), float("nan"), "big"):
        with pytest.raises(InputError, match="alpha"):
            gen.generate(PROMPTS, SEEDS, _direction(32), alpha)
    with pytest.raises(InputError, match="width 32"):
        gen.generate(PROMPTS, SEEDS, _direction(16), 1.0)
    with pytest.raises(InputError, match="width"):
        _generator(sd, sae=SAE(SAEConfig(d_in=16, d_sae=8, k=2)))
    with pytest.raises(InputError, match="layer=5"):
        _generator(sd, layer=5)
    with pytest.raises(InputError, match="seed"):
        gen.generate(PROMPTS, SEEDS[:1])
    with pytest.raises(InputError, match='where="active"'):
        _generator(sd, where="active").generate(PROMPTS, SEEDS, _direction(32), 1.0)
    with pytest.raises(InputError, match="out of range"):
        _generator(sd, where="active", sae=SAE(SAEConfig(d_in=32, d_sae=8, k=2)), latent=8)
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        load_generator(tmp_path)
    folder = save_pipeline(sd, tmp_path / "pipe")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(InputError, match="no text encoder"):
        load_generator(folder)
    with pytest.raises(InputError, match="text_encoder_2"):
        load_generator(folder, encoder="text_encoder_2")


# ----- the command line, end to end ---------------------------------------------------------
def test_cli_end_to_end_on_the_tiny_pipeline(sd, tmp_path, capsys):
    from PIL import Image

    pipe_dir = save_pipeline(sd, tmp_path / "sd")
    clip_dir = tiny_clip(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("# steered prompts\na cat\n\nthe red dog\n")
    (tmp_path / "corpus.txt").write_text("\n".join(["a cat on the mat", "the red dog", "a dog", "red cats",
                                                    "the cat and the dog", "on the mat"] * 3))
    out = tmp_path / "out"
    common = ["steer", "--pipeline", str(pipe_dir), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
              "--size", "32", "--no-progress"]
    rc = main([*common, "--alphas=-3,3", "--train-on", str(tmp_path / "corpus.txt"), "--top", "1", "--d-sae", "32",
               "--k", "3", "--epochs", "3", "--clip", str(clip_dir), "--attribute", "red", "--where", "active", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "sweep.json").read_text())
    assert data["alphas"] == [-3.0, 0.0, 3.0] and data["prompts"] == ["a cat", "the red dog"]
    entry = data["latents"][0]
    assert entry["max_activation"] > 0 and data["sae"]["source"] == "trained"
    zero = entry["sweep"][1]
    assert zero["alpha"] == 0.0 and zero["pixel_mae"] == 0.0 and zero["top1_change"] == 0.0 and zero["kl"] == 0.0
    assert zero["clip_prompt_delta"] == 0.0 and "clip_attribute" in zero
    assert data["settings"]["where"] == "active" and data["settings"]["classifier"] == "efficientnet-lite0"
    grid = Image.open(out / entry["grid"])
    assert grid.format == "PNG" and grid.size[0] > grid.size[1]
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "train" / "sae").is_dir()
    # the trained SAE, given back: a latent out of range, and a SAE of another width
    capsys.readouterr()
    rc = main([*common, "--sae", str(out / "train" / "sae"), "--latents", "32", "--out", str(tmp_path / "o2")])
    assert rc == 1 and "out of range" in capsys.readouterr().err
    SAE(SAEConfig(d_in=16, d_sae=8, k=2)).save(tmp_path / "narrow")
    rc = main([*common, "--sae", str(tmp_path / "narrow"), "--out", str(tmp_path / "o3")])
    assert rc == 1 and "width" in capsys.readouterr().err
    rc = main([*common, "--alphas=nan,2", "--sae", str(out / "train" / "sae"), "--latents", "0",
               "--out", str(tmp_path / "o4")])
    assert rc == 1 and "not finite" in capsys.readouterr().err


def test_cli_help_lists_the_output_files(capsys):
    with pytest.raises(SystemExit):
        main(["steer", "--help"])
    text = capsys.readouterr().out
    assert "sweep.json" in text and "latent_<j>.png" in text and "--cfg" in text
