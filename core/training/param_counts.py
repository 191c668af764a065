"""Parameter counts of a base's components and of what each method trains, from configs alone.

Torch-free (the memory planner, core/training/memory.py, runs in the API). The counts are exact:
tests/test_memory_planner.py compares them with diffusers' and transformers' own classes. They are
split by how optimizer state treats them (`Params`), since Adafactor factors matrices and kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from core.bases.architectures import CLIP_TOKENS, Architecture
from core.spec.methods import HYPER_LORA_FEATURES


@dataclass(frozen=True)
class Params:
    """Parameter counts by how optimizer state treats them."""

    conv: int = 0  # k x k kernels, k > 1: Adafactor factors their last two dims
    matrix: int = 0  # linear / 1x1 / embedding matrices: Adafactor keeps one row and one column
    vector: int = 0  # biases and norms: kept whole by every optimizer

    @property
    def total(self) -> int:
        return self.conv + self.matrix + self.vector

    def __add__(self, other: Params) -> Params:
        return Params(self.conv + other.conv, self.matrix + other.matrix, self.vector + other.vector)

    def __mul__(self, times: int) -> Params:
        return Params(self.conv * times, self.matrix * times, self.vector * times)


ZERO = Params()


def _conv(c_in: int, c_out: int, k: int = 3, bias: bool = True) -> Params:
    if k == 1:
        return Params(matrix=c_in * c_out, vector=c_out if bias else 0)
    return Params(conv=k * k * c_in * c_out, vector=c_out if bias else 0)


def _linear(n_in: int, n_out: int, bias: bool = True) -> Params:
    return Params(matrix=n_in * n_out, vector=n_out if bias else 0)


def _norm(width: int) -> Params:
    return Params(vector=2 * width)


def _resnet(c_in: int, c_out: int, temb: int | None) -> Params:
    p = _norm(c_in) + _conv(c_in, c_out) + _norm(c_out) + _conv(c_out, c_out)
    if temb:
        p += _linear(temb, c_out)
    if c_in != c_out:
        p += _conv(c_in, c_out, k=1)
    return p


def _transformer_layer(width: int, context: int) -> Params:
    attn1 = _linear(width, width, False) * 3 + _linear(width, width)
    attn2 = _linear(width, width, False) + _linear(context, width, False) * 2 + _linear(width, width)
    feed_forward = _linear(width, 8 * width) + _linear(4 * width, width)
    return _norm(width) * 3 + attn1 + attn2 + feed_forward


# --- the UNet as a list of blocks -------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    kind: str  # "resnet" | "transformer" | "sample" (a down/up-sampling conv)
    level: int  # 0 = full latent resolution; tokens shrink 4x per level
    c_in: int
    c_out: int
    layers: int = 1  # transformer layers in a transformer block
    context: int = 0  # cross-attention width of a transformer block

    def params(self, temb: int) -> Params:
        if self.kind == "resnet":
            return _resnet(self.c_in, self.c_out, temb)
        if self.kind == "sample":
            return _conv(self.c_in, self.c_out)
        width = self.c_out
        return (
            _norm(width) + _linear(width, width) * 2 + _transformer_layer(width, self.context) * self.layers
        )


def _per_block(value: Any, blocks: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def unet_blocks(unet: dict[str, Any], part: str = "all") -> Iterator[Block]:
    """The UNet's resnets, transformers and samplers in order (`part` "down+mid" for ControlNet)."""
    channels = list(unet["block_out_channels"])
    n = len(channels)
    layers = _per_block(unet.get("layers_per_block", 2), n)
    depth = _per_block(unet.get("transformer_layers_per_block", 1), n)
    context = int(unet.get("cross_attention_dim", 1280))
    attention = [t.startswith("CrossAttn") for t in unet["down_block_types"]]
    c_prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers[i]):
            yield Block("resnet", i, c_prev if j == 0 else c, c)
            if attention[i]:
                yield Block("transformer", i, c, c, depth[i], context)
        if i < n - 1:
            yield Block("sample", i, c, c)
        c_prev = c
    last = n - 1
    yield Block("resnet", last, channels[-1], channels[-1])
    yield Block("transformer", last, channels[-1], channels[-1], depth[-1], context)
    yield Block("resnet", last, channels[-1], channels[-1])
    if part != "all":
        return
    rev, rev_depth, rev_layers = channels[::-1], depth[::-1], layers[::-1]
    up_attention = [t.startswith("CrossAttn") for t in unet["up_block_types"]]
    out = rev[0]
    for i, c in enumerate(rev):
        prev, out = out, c
        skip_in = rev[min(i + 1, n - 1)]
        level = last - i
        for j in range(rev_layers[i] + 1):
            skip = skip_in if j == rev_layers[i] else c
            yield Block("resnet", level, (prev if j == 0 else c) + skip, c)
            if up_attention[i]:
                yield Block("transformer", level, c, c, rev_depth[i], context)
        if i < n - 1:
            yield Block("sample", level - 1, c, c)


def _time_embed(unet: dict[str, Any]) -> tuple[int, Params]:
    c0 = unet["block_out_channels"][0]
    temb = 4 * c0
    p = _linear(c0, temb) + _linear(temb, temb)
    if unet.get("addition_embed_type") == "text_time":
        p += _linear(int(unet["projection_class_embeddings_input_dim"]), temb) + _linear(temb, temb)
    return temb, p


def unet_params(unet: dict[str, Any]) -> Params:
    c0 = unet["block_out_channels"][0]
    temb, p = _time_embed(unet)
    p += _conv(unet.get("in_channels", 4), c0) + _norm(c0) + _conv(c0, unet.get("out_channels", 4))
    for block in unet_blocks(unet):
        p += block.params(temb)
    return p


def controlnet_params(unet: dict[str, Any], embedding: list[int]) -> Params:
    """`ControlNetModel.from_unet`: the UNet's input half, zero 1x1 convs, the conditioning embedding."""
    c0 = unet["block_out_channels"][0]
    temb, p = _time_embed(unet)
    p += _conv(unet.get("in_channels", 4), c0) + _conv(c0, c0, k=1)  # conv_in and its zero conv
    blocks = list(unet_blocks(unet, part="down+mid"))
    down, mid = blocks[:-3], blocks[-3:]
    for block in down:
        p += block.params(temb)
        if block.kind != "transformer":  # a zero conv after each down layer and each sampler
            p += _conv(block.c_out, block.c_out, k=1)
    for block in mid:
        p += block.params(temb)
    p += _conv(mid[-1].c_out, mid[-1].c_out, k=1)  # the mid block's zero conv
    p += _conv(3, embedding[0]) + _conv(embedding[-1], c0)
    for a, b in itertools.pairwise(embedding):
        p += _conv(a, a) + _conv(a, b)
    return p


def _vae_resnets(channels: list[int], layers: int, decoder: bool) -> Params:
    p = ZERO
    order = channels[::-1] if decoder else channels
    c_prev = order[0]
    for i, c in enumerate(order):
        for j in range(layers + (1 if decoder else 0)):
            p += _resnet(c_prev if j == 0 else c, c, None)
        if i < len(order) - 1:
            p += _conv(c, c)
        c_prev = c
    return p


def vae_params(vae: dict[str, Any]) -> Params:
    channels = list(vae["block_out_channels"])
    layers = int(vae.get("layers_per_block", 2))
    latent = int(vae.get("latent_channels", 4))
    top = channels[-1]
    mid = _resnet(top, top, None) * 2
    if vae.get("mid_block_add_attention", True):
        mid += _norm(top) + _linear(top, top) * 4
    encoder = _conv(vae.get("in_channels", 3), channels[0]) + _vae_resnets(channels, layers, False)
    encoder += mid + _norm(top) + _conv(top, 2 * latent) + _conv(2 * latent, 2 * latent, k=1)
    decoder = _conv(latent, top) + mid + _vae_resnets(channels, layers, True)
    decoder += (
        _norm(channels[0]) + _conv(channels[0], vae.get("out_channels", 3)) + _conv(latent, latent, k=1)
    )
    return encoder + decoder


def _clip_layers(config: dict[str, Any]) -> Params:
    width, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    layer = _norm(width) * 2 + _linear(width, width) * 4 + _linear(width, inner) + _linear(inner, width)
    return layer * int(config["num_hidden_layers"]) + _norm(width)


def text_encoder_params(config: dict[str, Any], projection: bool) -> Params:
    width = int(config["hidden_size"])
    tokens = int(config.get("max_position_embeddings", CLIP_TOKENS))
    p = _clip_layers(config) + Params(matrix=(int(config["vocab_size"]) + tokens) * width)
    if projection:
        p += _linear(width, int(config["projection_dim"]), bias=False)
    return p


def image_encoder_params(config: dict[str, Any]) -> Params:
    width, patch = int(config["hidden_size"]), int(config["patch_size"])
    positions = (int(config["image_size"]) // patch) ** 2 + 1
    p = _clip_layers(config) + _norm(width)  # pre-layernorm too
    p += Params(conv=3 * patch * patch * width, matrix=positions * width, vector=width)
    return p + _linear(width, int(config["projection_dim"]), bias=False)


def _transformers(unet: dict[str, Any]) -> list[Block]:
    return [b for b in unet_blocks(unet) if b.kind == "transformer"]


def lora_params(unet: dict[str, Any], rank: int, conv_ff: bool) -> Params:
    p = ZERO
    for block in unet_blocks(unet):
        if block.kind == "transformer":
            w, c = block.c_out, block.context
            attention = Params(matrix=rank * (14 * w + 2 * c))
            p += attention * block.layers
            if conv_ff:
                p += Params(matrix=rank * 14 * w) * block.layers + Params(matrix=rank * 4 * w)
        elif block.kind == "resnet" and conv_ff:
            p += Params(conv=9 * rank * (block.c_in + block.c_out), matrix=rank * 2 * block.c_out)
            if block.c_in != block.c_out:
                p += Params(matrix=rank * (block.c_in + block.c_out))
    return p


def hypernetwork_params(unet: dict[str, Any], structure: list[float], layer_norm: bool) -> Params:
    widths = {b.context for b in _transformers(unet)}
    p = ZERO
    for width in widths:
        sizes = [int(width * s) for s in structure]
        for a, b in itertools.pairwise(sizes):
            p += _linear(a, b) + (_norm(b) if layer_norm else ZERO)
    return p * 2  # a k and a v network per width


def ip_adapter_params(unet: dict[str, Any], image_embed: int, tokens: int = 4) -> Params:
    context = int(unet.get("cross_attention_dim", 1280))
    p = _linear(image_embed, context * tokens) + _norm(context)
    for block in _transformers(unet):
        p += Params(matrix=2 * context * block.c_out) * block.layers
    return p


def _lora_layers(unet: dict[str, Any], conv_ff: bool) -> int:
    """How many layers the `lora` method's targets select (what lora_params sums over)."""
    count = 0
    for block in unet_blocks(unet):
        if block.kind == "transformer":
            count += (8 + (2 if conv_ff else 0)) * block.layers + (2 if conv_ff else 0)
        elif block.kind == "resnet" and conv_ff:
            count += 2 + (block.c_in != block.c_out)
    return count


def hyper_lora_params(unet: dict[str, Any], token_dim: int, params: Any) -> Params:
    """core.methods.hyper_lora.HyperLoraNetwork, exactly: the token mixer, the coefficient heads
    and a basis of `basis_size` LoRAs per layer."""
    hidden, basis = params.hidden_dim, params.basis_size
    conv_ff = params.targets == "attention+conv+ff"
    mixer = _linear(hidden, 3 * hidden) + _linear(hidden, hidden) + _norm(hidden) * 2
    mixer += _linear(hidden, 2 * hidden) + _linear(2 * hidden, hidden)
    heads = _linear(hidden, _lora_layers(unet, conv_ff) * 2 * basis)
    return (
        _norm(token_dim)
        + _linear(token_dim, hidden)
        + mixer
        + heads
        + lora_params(unet, params.rank, conv_ff) * basis
    )


def controlnet_embedding(arch: Architecture, params: Any) -> list[int]:
    if params.conditioning_embedding_out_channels:
        return list(params.conditioning_embedding_out_channels)
    levels = len(arch.vae["block_out_channels"])
    return [16, 32, 96, 256][:levels]


# --- what each method trains: core.spec.catalogue's MemoryTerms.trained names one of these ---------
def _lora_layers_trained(params: Any, arch: Architecture) -> Params:
    p = lora_params(arch.unet, params.rank, params.targets == "attention+conv+ff")
    if params.train_text_encoder:
        rank = params.text_encoder_rank or params.rank
        for te in arch.text_encoders:
            p += Params(matrix=8 * rank * te["hidden_size"]) * te["num_hidden_layers"]
    return p


def _full_unet_trained(params: Any, arch: Architecture) -> Params:
    p = unet_params(arch.unet)
    if params.train_text_encoder:
        for i, te in enumerate(arch.text_encoders):
            p += text_encoder_params(te, projection=i == 1)
    return p


def _token_embeddings_trained(params: Any, arch: Architecture) -> Params:
    return Params(matrix=sum(params.num_vectors * te["hidden_size"] for te in arch.text_encoders))


def _context_mlps_trained(params: Any, arch: Architecture) -> Params:
    return hypernetwork_params(arch.unet, params.layer_structure, params.layer_norm)


def _controlnet_trained(params: Any, arch: Architecture) -> Params:
    return controlnet_params(arch.unet, controlnet_embedding(arch, params))


def _ip_adapter_trained(params: Any, arch: Architecture) -> Params:
    image = arch.image_encoder or {}
    return ip_adapter_params(arch.unet, int(image.get("projection_dim", 1024)))


def _lora_predictor_trained(params: Any, arch: Architecture) -> Params:
    image = arch.image_encoder or {}
    token_dim = len(HYPER_LORA_FEATURES) * int(image.get("hidden_size", 1280))
    return hyper_lora_params(arch.unet, token_dim, params)


# (the method's params, the base's architecture) -> the parameters the method trains
TRAINED_COUNTS: dict[str, Callable[[Any, Architecture], Params]] = {
    "lora_layers": _lora_layers_trained,
    "full_unet": _full_unet_trained,
    "token_embeddings": _token_embeddings_trained,
    "context_mlps": _context_mlps_trained,
    "controlnet_copy": _controlnet_trained,
    "ip_attention": _ip_adapter_trained,
    "lora_predictor": _lora_predictor_trained,
}
