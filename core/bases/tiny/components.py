"""Architectures of the tiny bases, and their offline tokenizer.

The shapes follow SD1.x / SDXL (same classes, same wiring, attention where LoRA and adapters
expect it), only small enough to pre-train on two CPU cores in about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

IMAGE_SIZE = 32
LATENT_SIZE = IMAGE_SIZE // 2  # two VAE levels: one halving
MAX_TOKENS = 77  # as CLIP; byte-level tokens make prompts ~3x longer than real CLIP BPE does
TEXT_HIDDEN = 32
SDXL_TIME_EMBED = 8
SDXL_TIME_IDS = 6  # original size, crop top-left, target size

# Byte-level vocabulary: every byte as a word-inner and a word-final ("</w>") symbol, then the two
# specials. With no merges the BPE never joins symbols, so any text tokenizes and nothing is UNK.
_BYTES = list(bytes_to_unicode().values())
BOS_ID = 2 * len(_BYTES)
EOS_ID = BOS_ID + 1
VOCAB_SIZE = EOS_ID + 1


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(_BYTES + [b + "</w>" for b in _BYTES])}
    vocab |= {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder)


def _text_config(layers: int, projection_dim: int | None = None) -> CLIPTextConfig:
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=2,  # head dim 16: CPU attention kernels crawl at head dim 8
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        **extra,
    )


def text_encoder() -> CLIPTextModel:
    return CLIPTextModel(_text_config(layers=2))


def sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    # SDXL reads the penultimate layer of both encoders, so each needs a layer after the one read.
    first = CLIPTextModel(_text_config(layers=3))
    second = CLIPTextModelWithProjection(_text_config(layers=3, projection_dim=TEXT_HIDDEN))
    return first, second


def image_encoder() -> CLIPVisionModelWithProjection:
    """The frozen image encoder IP-Adapter reads: a CLIP ViT at the tiny image size.

    It stays random: a random ViT's embedding still separates the world's colours and layouts, and
    IP-Adapter trains only the projection and the new key/value weights on top of it.
    """
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,  # 4x4 patches of the 32px image
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPVisionModelWithProjection(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        # One group: with few channels per group, GroupNorm flattens a solid colour's features to
        # a sign pattern and the VAE can only draw a handful of flat colours.
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
        # Mid-block attention costs more than it gives at 16x16; without it the VAE is fully
        # convolutional, which lets pre-training use cheap crops.
        mid_block_add_attention=False,
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        # Attention at the 8x8 level (down, mid, up) as SDXL does at its lower levels: full-size
        # attention would double the pre-training cost for no visible gain on this world.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(1, 2),  # diffusers' legacy name: the number of heads (dim 16 each)
        # Few, wide groups for the same reason as the VAE's; 8 groups learned colours more slowly.
        norm_num_groups=4,
        **extra,
    )


def unet_sd() -> UNet2DConditionModel:
    return _unet(TEXT_HIDDEN)


def unet_sdxl() -> UNet2DConditionModel:
    # diffusers concatenates both encoders' hidden states, and adds the pooled projection of
    # encoder 2 to the embedded time ids: the input width must match exactly.
    return _unet(
        2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * SDXL_TIME_EMBED + TEXT_HIDDEN,
    )


def scheduler() -> DDIMScheduler:
    """The folder's scheduler: DDIM for sampling; training reads the same config as DDPMScheduler.

    v-prediction because with epsilon prediction a model this small never moved its samples to a
    learned colour; "trailing" spacing so sampling starts at the last training timestep.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )
