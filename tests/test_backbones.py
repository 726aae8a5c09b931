"""Backbones: record from tiny random-initialized models of every family (and the real
EfficientNet-Lite0 offline); shapes, token kinds, the token -> image/patch mapping;
splicing with the error term reproduces outputs exactly, and an edit changes them."""

import numpy as np
import pytest
import torch

from saeengine import SAE, SAEConfig
from saeengine.backbones import (efficientnet_lite, open_clip_vision, record_activations, set_latent, splice,
                                 timm_vit, transformers_vision)
from saeengine.store import ActivationStore

transformers = pytest.importorskip("transformers", reason="the transformers backbones need transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)


def tiny_transformers(kind):
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
    if kind == "dinov2":
        return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=2))
    return transformers.ViTModel(transformers.ViTConfig(**TINY))


def tiny_timm():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                             reg_tokens=1)


def tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2,
                                                              head_width=16),
                                text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))


def tiny_efficientnet():
    """EfficientNet-Lite0's architecture at 32 px with random weights, re-drawn at a larger
    scale (the default init gives maps that both memory layouts happen to round alike)."""
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 needs efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_name("efficientnet-lite0")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    backbone = efficientnet_lite(model)
    backbone.image_size = 32
    return backbone


# (family, builder, expected prefix kinds, patches per image at blocks.1)
FAMILIES = [
    ("clip", lambda: transformers_vision(tiny_transformers("clip")), ["cls"], 16),
    ("siglip", lambda: transformers_vision(tiny_transformers("siglip")), [], 16),
    ("dinov2", lambda: transformers_vision(tiny_transformers("dinov2")), ["cls", "register", "register"], 16),
    ("vit", lambda: transformers_vision(tiny_transformers("vit")), ["cls"], 16),
    ("timm", lambda: timm_vit(tiny_timm()), ["cls", "register"], 16),
    ("open_clip", lambda: open_clip_vision(tiny_open_clip()), ["cls"], 16),
    ("efficientnet", tiny_efficientnet, [], 8 * 8),  # feature maps: the spliced one must keep its layout
]


def random_images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def hidden_after(backbone, layer, pixels):
    caught = {}

    def catch(module, inputs, output):  # returns None: a hook's return value would replace the output
        caught.setdefault("t", backbone.to_tokens(output))

    handle = backbone.layer_module(layer).register_forward_hook(catch)
    with torch.no_grad():
        out = backbone.forward(pixels)
    handle.remove()
    return caught["t"], out


def output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state


@pytest.mark.parametrize("name,build,prefix,patches", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_record_shapes_kinds_and_sources(tmp_path, name, build, prefix, patches):
    torch.manual_seed(0)
    backbone = build()
    assert backbone.token_kinds(len(prefix) + patches) == prefix + ["patch"] * patches
    images = random_images(5)
    stores = record_activations(backbone, images, ["blocks.0", "blocks.1"], tmp_path, keep=("patch",),
                                batch_size=2, dtype="float32", progress=False)
    tokens, _ = hidden_after(backbone, "blocks.1", backbone.preprocess(images))
    store = ActivationStore(stores["blocks.1"])
    assert store.n_tokens == 5 * patches and store.d_in == tokens.shape[2]
    assert store.meta.extra["token_kinds"] == prefix + ["patch"] * patches
    rows = np.array([0, patches - 1, 3 * patches + 7])
    image, position = store.sources(rows)
    assert image.tolist() == [0, 0, 3] and position.tolist() == [len(prefix), len(prefix) + patches - 1, len(prefix) + 7]
    for row, img, pos in zip(rows, image, position):  # the stored token is that image's token at that position
        torch.testing.assert_close(store.get([row])[0], tokens[img, pos], rtol=1e-5, atol=1e-5)
    if "register" in prefix:  # registers excluded unless asked for
        with_reg = record_activations(backbone, images[:1], ["blocks.0"], tmp_path / "reg",
                                      keep=("register",), progress=False)
        assert ActivationStore(with_reg["blocks.0"]).n_tokens == prefix.count("register")


@pytest.mark.parametrize("name,build,prefix,patches", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_splice_with_error_term_is_exact_and_edits_change_output(name, build, prefix, patches):
    torch.manual_seed(0)
    backbone = build()
    pixels = backbone.preprocess(random_images(2))
    tokens, reference = hidden_after(backbone, "blocks.0", pixels)
    sae = SAE(SAEConfig(d_in=tokens.shape[2], d_sae=64, k=4), seed=0)
    with torch.no_grad():
        with splice(backbone, "blocks.0", sae):
            same = backbone.forward(pixels)
        assert torch.equal(output_tensor(same), output_tensor(reference))
        latent = int(sae.encode(tokens.reshape(-1, tokens.shape[2])).indices[0, 0])
        with splice(backbone, "blocks.0", sae, edit=set_latent(latent, 50.0)):
            edited = backbone.forward(pixels)
        assert not torch.allclose(output_tensor(edited), output_tensor(reference))
        with splice(backbone, "blocks.0", sae, error_term=False):
            recon_only = backbone.forward(pixels)
        assert not torch.equal(output_tensor(recon_only), output_tensor(reference))
    with torch.no_grad():  # the hook is gone after the block
        assert torch.equal(output_tensor(backbone.forward(pixels)), output_tensor(reference))


def test_efficientnet_lite0_records_real_images_offline(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 needs efficientnet_lite_pytorch")
    skimage_data = pytest.importorskip("skimage.data")
    backbone = efficientnet_lite()
    images = [skimage_data.chelsea(), skimage_data.coffee()]
    with torch.no_grad():
        logits = backbone.forward(backbone.preprocess(images))
    assert logits.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso: the real weights loaded
    stores = record_activations(backbone, images, ["blocks.5"], tmp_path, progress=False)
    store = ActivationStore(stores["blocks.5"])
    grid = store.meta.extra["tokens_per_image"]
    assert store.n_tokens == 2 * grid and store.d_in == 80 and grid == 14 * 14
    assert store.sources([grid + 3])[0].tolist() == [1]
    pixels = backbone.preprocess(images)  # splicing the real model is exact too (it was 1.3e-5 off)
    sae = SAE(SAEConfig(d_in=80, d_sae=64, k=4), seed=0)
    with torch.no_grad(), splice(backbone, "blocks.5", sae):
        spliced = backbone.forward(pixels)
    assert torch.equal(spliced, logits)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_splice_keeps_signed_zeros_and_the_block_layout(memory_format):
    """x - (+0.0) is x for every float, -0.0 included (x + 0.0 is not), and the block's
    output goes back in the memory layout it came out in."""
    from saeengine.backbones import Backbone

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

        def forward(self, x):
            return self.blocks[0](x.contiguous(memory_format=memory_format))

    backbone = Backbone(Model(), "identity", image_size=4, mean=(0, 0, 0), std=(1, 1, 1), spatial=True)
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, :2] = -0.0
    sae = SAE(SAEConfig(d_in=3, d_sae=16, k=2), seed=0)
    with torch.no_grad(), splice(backbone, "blocks.0", sae):
        out = backbone.forward(x)
    reference = backbone.forward(x)
    assert torch.equal(out.view(torch.int32), reference.view(torch.int32))  # bit for bit, signs of zeros too
    assert out.stride() == reference.stride()


def test_layer_names_and_errors():
    backbone = transformers_vision(tiny_transformers("vit"))
    assert backbone.layer_names() == ["blocks.0", "blocks.1"]
    with pytest.raises(ValueError, match=r"blocks.0 .. blocks.1; got 'blocks.7'"):
        backbone.layer_module("blocks.7")
    from saeengine.backbones import load_backbone
    with pytest.raises(ValueError, match="unknown backbone family 'resnet'"):
        load_backbone("resnet", "x")
    with pytest.raises(RuntimeError, match="local paths; a hub name works only on a machine that is online"):
        load_backbone("transformers", "/nonexistent/model-folder")


def tiny_text_encoder():
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=99, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return transformers.CLIPTextModel(config)


def tiny_llava():
    vision = transformers.CLIPVisionConfig(**TINY)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=100,
                                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                                      image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(config)


def test_text_encoder_records_per_prompt_token(tmp_path):
    from saeengine.backbones import text_encoder
    torch.manual_seed(0)
    backbone = text_encoder(tiny_text_encoder())
    prompts = [[0, 5, 6, 7, 2], [0, 9, 2]]  # bos ... eos, token ids (a tokenizer makes these from strings)
    kinds = backbone.sample_token_kinds(backbone.preprocess(prompts), 5)
    assert kinds == [["bos", "text", "text", "text", "eos"], ["bos", "text", "eos", "pad", "pad"]]
    stores = record_activations(backbone, prompts, ["blocks.1"], tmp_path, keep=("text", "eos"), dtype="float32",
                                progress=False)
    store = ActivationStore(stores["blocks.1"])
    assert store.n_tokens == 4 + 2
    prompt, position = store.sources(np.arange(6))
    assert prompt.tolist() == [0, 0, 0, 0, 1, 1] and position.tolist() == [1, 2, 3, 4, 1, 2]
    inputs = backbone.preprocess(prompts)
    tokens, _ = hidden_after(backbone, "blocks.1", inputs)
    torch.testing.assert_close(store.get([5])[0], tokens[1, 2])
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4), seed=0)
    with torch.no_grad(), splice(backbone, "blocks.0", sae):
        spliced = backbone.forward(inputs)
    _, reference = hidden_after(backbone, "blocks.0", inputs)
    assert torch.equal(spliced.last_hidden_state, reference.last_hidden_state)
    with pytest.raises(ValueError, match="prompts need a tokenizer"):
        backbone.preprocess(["a photo of a cat"])


def test_llava_labels_image_and_text_tokens(tmp_path):
    from saeengine.backbones import llava
    torch.manual_seed(0)
    backbone = llava(tiny_llava())
    example = {"input_ids": [1, 5, 6] + [100] * 16 + [7, 8], "pixel_values": torch.randn(1, 3, 32, 32)}
    short = {"input_ids": [1, 9] + [100] * 16, "pixel_values": torch.randn(1, 3, 32, 32)}
    inputs = backbone.preprocess([example, short])
    kinds = backbone.sample_token_kinds(inputs, 21)
    assert kinds[0] == ["text"] * 3 + ["image"] * 16 + ["text"] * 2
    assert kinds[1] == ["text"] * 2 + ["image"] * 16 + ["pad"] * 3
    stores = record_activations(backbone, [example, short], ["blocks.1"], tmp_path, keep=("image", "text"),
                                dtype="float32", progress=False)
    store = ActivationStore(stores["blocks.1"])
    assert store.n_tokens == 21 + 18 and store.d_in == 32
    assert store.sources([21])[0].tolist() == [1] and store.sources([21])[1].tolist() == [0]


def test_llava_next_inputs_keep_their_image_sizes():
    """LLaVA-NeXT-style examples carry image_sizes [n_images, 2]; the batch concatenates
    them in example order (the model tiles each image by its size)."""
    from saeengine.backbones import llava
    backbone = llava(tiny_llava())
    examples = [{"input_ids": [1, 100], "pixel_values": torch.randn(1, 3, 32, 32), "image_sizes": [[32, 48]]},
                {"input_ids": [1, 100, 5], "pixel_values": torch.randn(1, 3, 32, 32), "image_sizes": [[64, 32]]}]
    batch = backbone.preprocess(examples)
    assert batch["image_sizes"].tolist() == [[32, 48], [64, 32]]
    assert "image_sizes" not in backbone.preprocess([{k: v for k, v in examples[0].items() if k != "image_sizes"}])


@pytest.mark.parametrize("subfolder", ["text_encoder", "text_encoder_2"])
def test_text_encoders_load_from_a_local_diffusion_pipeline_folder(tmp_path, subfolder):
    """A diffusers pipeline folder: text_encoder (CLIPTextModel) and, in SDXL-style
    pipelines, text_encoder_2 (CLIPTextModelWithProjection)."""
    from saeengine.backbones import load_backbone
    torch.manual_seed(0)
    model = tiny_text_encoder()
    if subfolder == "text_encoder_2":
        model = transformers.CLIPTextModelWithProjection(model.config)
    model.save_pretrained(tmp_path / "pipeline" / subfolder)
    backbone = load_backbone("text-encoder", tmp_path / "pipeline", subfolder=subfolder)
    assert backbone.name == f"text-encoder:{subfolder}"
    inputs = backbone.preprocess([[0, 5, 2]])
    tokens, _ = hidden_after(backbone, "blocks.1", inputs)
    reference, _ = hidden_after(text_encoder_instance(model), "blocks.1", inputs)
    assert torch.equal(tokens, reference)
    with pytest.raises(FileNotFoundError, match="pass a local pipeline folder"):
        load_backbone("text-encoder", tmp_path / "nowhere")


def text_encoder_instance(model):
    from saeengine.backbones import text_encoder
    return text_encoder(model)


def test_llava_splice_with_error_term_is_exact(tmp_path):
    from saeengine.backbones import llava
    torch.manual_seed(0)
    backbone = llava(tiny_llava())
    inputs = backbone.preprocess([{"input_ids": [1, 5] + [100] * 16 + [7], "pixel_values": torch.randn(1, 3, 32, 32)}])
    _, reference = hidden_after(backbone, "blocks.0", inputs)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4), seed=0)
    with torch.no_grad(), splice(backbone, "blocks.0", sae):
        spliced = backbone.forward(inputs)
    assert torch.equal(spliced.logits, reference.logits)
    with torch.no_grad(), splice(backbone, "blocks.0", sae, edit=set_latent(3, 25.0)):
        edited = backbone.forward(inputs)
    assert not torch.allclose(edited.logits, reference.logits)
