"""A tiny random-initialized LLaVA (CLIP vision tower + Llama language model) and a matching
processor, built from configs: nothing is downloaded.

The vision tower sees 32x32 images in 8x8 patches: 16 patch features (its CLS is dropped,
vision_feature_select_strategy="default"), so every image expands to IMAGE_TOKENS = 16
copies of the image token IMAGE_TOKEN_ID. The processor's tokenizer is a word-level
vocabulary (lower-case words split on whitespace and punctuation, unknown words -> <unk>)
that puts <s> before every text.
"""

from __future__ import annotations

from pathlib import Path

import transformers

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
WORDS = ("a photo of the red green blue cat dog car tree house bird small big on in with and is "
         "sky grass water road sun").split()
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
IMAGE_TOKEN = "<image>"
VOCAB = {word: i for i, word in enumerate((*SPECIALS, *WORDS, IMAGE_TOKEN))}
IMAGE_TOKEN_ID = VOCAB[IMAGE_TOKEN]
BOS_ID, PAD_ID = VOCAB["<s>"], VOCAB["<pad>"]


def tiny_llava_config(n_layers: int = 3, hidden: int = 32) -> "transformers.LlavaConfig":
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=len(VOCAB) + 4,
                                    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=VOCAB["</s>"])
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                    vision_feature_select_strategy="default", vision_feature_layer=-1,
                                    image_seq_length=IMAGE_TOKENS)


def tiny_llava(n_layers: int = 3, seed: int = 0) -> "transformers.LlavaForConditionalGeneration":
    """A random-init LlavaForConditionalGeneration in eval mode (seeded)."""
    import torch

    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(tiny_llava_config(n_layers)).eval()


def tiny_processor() -> "transformers.LlavaProcessor":
    """A LlavaProcessor: CLIP image preprocessing to 32x32 and the word-level tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


def save_tiny_llava(folder: str | Path, n_layers: int = 3, seed: int = 0) -> Path:
    """Write the tiny model and its processor to ``folder`` (a local model folder)."""
    folder = Path(folder)
    tiny_llava(n_layers, seed).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder
