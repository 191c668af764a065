"""The memory planner: a job's peak accelerator memory, predicted before it is queued.

Torch-free, so the API can answer "does this fit?" before any GPU time. A job's peak is

    weights (frozen ones in the training dtype, trained ones and the VAE in fp32)
  + optimizer state (AdamW 8 B, 8-bit AdamW 2 B per trained parameter; Adafactor keeps factored
    moments: nothing per matrix element, 2/3 of each 3x3 kernel, all of every vector)
  + max(gradients (4 B per trained parameter) + autocast's low-precision copies of trained weights,
        activations saved for backward)
  + a workspace term.

Parameter counts are exact (computed from the components' configs; tests compare them with
diffusers' and transformers' own classes). Activations are a sum over the UNet's blocks, each
block's saved bytes proportional to its width times the tokens at its level:

    batch * sum_level tokens(level) * (K_res * (c_in + c_out) per resnet + K_tf * width per
    transformer layer)  [+ the text encoders' layers when they carry gradients]

with the bytes-per-element constants `K_res`, `K_tf` per method and checkpointing mode measured,
not guessed: `bench/realsize.py` runs real steps of every method on the SD1.5 and SDXL
architectures at two resolutions and records the peak of live tensor bytes (a dispatch-mode count
on the CPU, `max_memory_allocated` on CUDA); the per-pixel slope gives these constants. The peak
of caching (the VAE encoding images in fp32, a few at a time) is planned too: at 1024 px it can
exceed the training step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from core.bases.architectures import CLIP_TOKENS, Architecture
from core.spec.job import JobSpec
from core.spec.methods import HYPER_LORA_FEATURES
from core.spec.training import TrainingParams

GIB = 1024**3
# Images the VAE encodes at once while caching, scaled so each chunk holds about two 512 px images
# (core/training/caching.py reads the same function).
ENCODE_PIXELS = 2 * 512 * 512


def encode_chunk(pixels: int) -> int:
    """Images per VAE call while caching, for images of `pixels` pixels."""
    return max(1, min(8, ENCODE_PIXELS // pixels))


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


# --- what a job trains and keeps ------------------------------------------------------------------
def trained_params(spec: JobSpec, arch: Architecture) -> Params:
    params, unet = spec.params, arch.unet
    method = params.method
    if method == "lora":
        p = lora_params(unet, params.rank, params.targets == "attention+conv+ff")
        if params.train_text_encoder:
            rank = params.text_encoder_rank or params.rank
            for te in arch.text_encoders:
                p += Params(matrix=8 * rank * te["hidden_size"]) * te["num_hidden_layers"]
        return p
    if method == "dreambooth":
        p = unet_params(unet)
        if params.train_text_encoder:
            for i, te in enumerate(arch.text_encoders):
                p += text_encoder_params(te, projection=i == 1)
        return p
    if method == "textual_inversion":
        return Params(matrix=sum(params.num_vectors * te["hidden_size"] for te in arch.text_encoders))
    if method == "hypernetwork":
        return hypernetwork_params(unet, params.layer_structure, params.layer_norm)
    if method == "controlnet":
        return controlnet_params(unet, controlnet_embedding(arch, params))
    image = arch.image_encoder or {}
    if method == "hyper_lora":
        token_dim = len(HYPER_LORA_FEATURES) * int(image.get("hidden_size", 1280))
        return hyper_lora_params(unet, token_dim, params)
    return ip_adapter_params(unet, int(image.get("projection_dim", 1024)))


def frozen_bytes(spec: JobSpec, arch: Architecture, weight_bytes: int) -> int:
    """The base's weights as the loop keeps them: VAE fp32, frozen components at `weight_bytes`,
    trained components (counted with the trained parameters) not at all; IP-Adapter's image
    encoder in fp32."""
    trained = spec.params.trained_components()
    method = spec.params.method
    total = vae_params(arch.vae).total * 4
    if "unet" not in trained or method == "controlnet":
        total += unet_params(arch.unet).total * weight_bytes
    for i, te in enumerate(arch.text_encoders):
        name = ("text_encoder", "text_encoder_2")[i]
        if name not in trained:
            total += text_encoder_params(te, projection=i == 1).total * weight_bytes
    if method in ("ip_adapter", "hyper_lora") and arch.image_encoder:
        total += image_encoder_params(arch.image_encoder).total * 4
    return total


def optimizer_bytes(name: str, p: Params) -> int:
    if name == "adamw":
        return 8 * p.total
    if name == "adamw_8bit":
        return 2 * p.total
    # Adafactor: a row and a column per matrix (negligible), 6 of 9 per 3x3 kernel, whole vectors.
    return 4 * (p.vector + (2 * p.conv) // 3)


@dataclass(frozen=True)
class Activations:
    """Per sample: sum of (c_in + c_out) * tokens over resnets, width * tokens over transformer
    layers (ControlNet's copy counted again), and width * 77 over text-encoder layers."""

    resnet: float
    transformer: float
    text: float


def activation_sums(spec: JobSpec, arch: Architecture, resolution: int) -> Activations:
    tokens0 = (resolution // arch.vae_factor) ** 2
    resnet = transformer = 0.0
    part = "all"
    passes = [part, "down+mid"] if spec.params.method == "controlnet" else [part]
    for which in passes:
        for block in unet_blocks(arch.unet, part=which):
            tokens = tokens0 / 4**block.level
            if block.kind == "resnet":
                resnet += (block.c_in + block.c_out) * tokens
            elif block.kind == "transformer":
                transformer += block.c_out * block.layers * tokens
    carries = spec.params.method == "textual_inversion" or getattr(spec.params, "train_text_encoder", False)
    text = (
        sum(te["hidden_size"] * te["num_hidden_layers"] * CLIP_TOKENS for te in arch.text_encoders)
        if carries
        else 0.0
    )
    return Activations(resnet, transformer, text)


# --- the estimate ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coefficients:
    """Saved bytes per element of each activation sum (bf16 autocast), measured by bench/realsize.py."""

    resnet: float
    transformer: float
    text: float


# (method, gradient checkpointing) -> coefficients; see the module docstring for how they were fitted.
# Fitted by bench/fit_memory.py on 42 real steps (bench/realsize.py, CPU, bf16 autocast: SD1.5 at
# 128/256/512 px, SDXL at 128/256/512 px, every method, with and without checkpointing); the adapters
# share one fit, DreamBooth and ControlNet are one factor on it (see that script's docstring).
ACTIVATION_COEFFICIENTS: dict[tuple[str, bool], Coefficients] = {
    ("lora", False): Coefficients(resnet=4.278, transformer=59.693, text=0.0),
    ("hypernetwork", False): Coefficients(resnet=4.278, transformer=59.693, text=0.0),
    ("ip_adapter", False): Coefficients(resnet=4.278, transformer=59.693, text=0.0),
    ("lora", True): Coefficients(resnet=5.304, transformer=0.0, text=0.0),
    ("hypernetwork", True): Coefficients(resnet=5.304, transformer=0.0, text=0.0),
    ("ip_adapter", True): Coefficients(resnet=5.304, transformer=0.0, text=0.0),
    ("dreambooth", False): Coefficients(resnet=4.943, transformer=68.977, text=0.0),
    ("dreambooth", True): Coefficients(resnet=5.25, transformer=0.0, text=0.0),
    ("textual_inversion", False): Coefficients(resnet=8.946, transformer=39.071, text=28.364),
    ("textual_inversion", True): Coefficients(resnet=5.097, transformer=0.0, text=2.127),
    ("controlnet", False): Coefficients(resnet=3.529, transformer=49.248, text=0.0),
    ("controlnet", True): Coefficients(resnet=5.978, transformer=0.0, text=0.0),
}
# Tensors of (encode chunk x pixels x the VAE's first width) the fp32 VAE keeps alive at once while
# encoding (and, one image at a time, decoding samples and class images).
VAE_LIVE_TENSORS = 5.0
# Not in the allocator's count, but on the card: the CUDA context, cuBLAS/cuDNN workspaces and
# fragmentation. A job fits a worker when its estimate plus this reserve fits the worker's memory.
RESERVE_BYTES = GIB + GIB // 2


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    # Where the peak falls: "step" (training), "caching" (VAE encoding, class images) or "loading"
    # (ControlNet's copy of the still-fp32 UNet).
    phase: str
    parts: dict[str, int]

    def to_public(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 2),
            "phase": self.phase,
            "parts": dict(self.parts),
        }


def _precision(training: TrainingParams, device: str) -> tuple[int, bool]:
    """(bytes per frozen weight, autocast on) as core.training.optim.resolve_precision decides."""
    mode = training.mixed_precision
    if device == "cuda":
        return (4, False) if mode == "no" else (2, True)
    if mode != "bf16":
        return (4, False)
    # A CPU worker runs bf16 only where the CPU has it natively (resolve_precision says why). CPU
    # workers are local runs, where the planner's host is the worker's: its CPU stands for theirs.
    from core.cpu_features import cpu_has_native_bf16

    return (2, True) if cpu_has_native_bf16() else (4, False)


def coefficients(method: str, checkpointing: bool) -> Coefficients:
    return (
        ACTIVATION_COEFFICIENTS.get((method, checkpointing))
        or ACTIVATION_COEFFICIENTS[("lora", checkpointing)]
    )


def estimate(
    spec: JobSpec, arch: Architecture, *, device: str = "cuda", images: int | None = None
) -> MemoryEstimate:
    """Peak tensor memory of `spec` on `arch` (bytes), as `torch.cuda.max_memory_allocated` counts.
    `images`: the dataset's size, where known (a small dataset is VAE-encoded in fewer at once)."""
    training = spec.training
    weight_bytes, autocast = _precision(training, device)
    resolution = training.resolution or arch.resolution
    trained = trained_params(spec, arch)
    frozen = frozen_bytes(spec, arch, weight_bytes)
    optimizer = optimizer_bytes(training.optimizer, trained)
    gradients = 4 * trained.total
    copies = 2 * (trained.conv + trained.matrix) if autocast else 0
    sums = activation_sums(spec, arch, resolution)
    k = coefficients(spec.params.method, training.gradient_checkpointing)
    samples = training.batch_size * (2 if getattr(spec.params, "prior_preservation", False) else 1)
    scale = 1.0 if autocast else 2.0  # fp32 activations take twice bf16's bytes
    activations = int(
        samples * scale * (k.resnet * sums.resnet + k.transformer * sums.transformer + k.text * sums.text)
    )
    step = frozen + 4 * trained.total + optimizer + max(gradients, activations + copies)
    c0 = int(arch.vae["block_out_channels"][0])
    views = images * (2 if training.random_flip else 1) if images else None
    chunk = min(encode_chunk(resolution * resolution), views or 8)
    vae = int(VAE_LIVE_TENSORS * chunk * resolution * resolution * c0 * 4)
    caching = frozen + 4 * trained.total + vae
    parts = {
        "weights": frozen,
        "trained_weights": 4 * trained.total,
        "optimizer_state": optimizer,
        "gradients": gradients,
        "autocast_copies": copies,
        "activations": activations,
        "vae_encoding": vae,
    }
    # ControlNet is copied from the fp32 UNet (as diffusers' recipe does) before the UNet is cast.
    unet_fp32 = (4 - weight_bytes) * unet_params(arch.unet).total if spec.params.method == "controlnet" else 0
    loading = frozen + 4 * trained.total + unet_fp32
    phases = {"step": step, "caching": caching, "loading": loading}
    phase = max(phases, key=lambda name: phases[name])
    return MemoryEstimate(phases[phase], phase, parts)


# --- fitting a job to a worker ---------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    field: str  # a JSON path into the job, e.g. "training.gradient_checkpointing"
    before: Any
    after: Any
    reason: str
    peak_bytes_after: int

    def to_public(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "from": self.before,
            "to": self.after,
            "reason": self.reason,
            "peak_bytes_after": self.peak_bytes_after,
        }


@dataclass(frozen=True)
class FitPlan:
    fits: bool
    capacity_bytes: int
    estimate: MemoryEstimate  # of `spec`, after the changes
    spec: JobSpec  # the job as it would run: the original, or with `changes` applied
    changes: list[Change]

    def to_public(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "capacity_bytes": self.capacity_bytes,
            "reserve_bytes": RESERVE_BYTES,
            "estimate": self.estimate.to_public(),
            "changes": [c.to_public() for c in self.changes],
        }


def fits(estimate_: MemoryEstimate, capacity_bytes: int) -> bool:
    return estimate_.peak_bytes + RESERVE_BYTES <= capacity_bytes


def _with_training(spec: JobSpec, **changes: Any) -> JobSpec:
    training = spec.training.model_copy(update=changes)
    return spec.model_copy(update={"training": training})


def plan_fit(
    spec: JobSpec,
    arch: Architecture,
    capacity_bytes: int,
    *,
    auto: bool,
    optimizers: frozenset[str] = frozenset({"adamw", "adafactor"}),
    device: str = "cuda",
) -> FitPlan:
    """Does `spec` fit `capacity_bytes`? With `auto`, the smallest series of changes that makes it
    fit: gradient checkpointing, then 8-bit (where workers have bitsandbytes) or factored optimizer
    state, then smaller micro-batches with more accumulation (the same effective batch)."""
    current = estimate(spec, arch, device=device)
    if fits(current, capacity_bytes) or not auto:
        return FitPlan(fits(current, capacity_bytes), capacity_bytes, current, spec, [])
    changes: list[Change] = []

    def apply(new_spec: JobSpec, field_name: str, before: Any, after: Any, reason: str) -> bool:
        nonlocal spec, current
        spec, current = new_spec, estimate(new_spec, arch, device=device)
        changes.append(Change(field_name, before, after, reason, current.peak_bytes))
        return fits(current, capacity_bytes)

    training = spec.training
    if not training.gradient_checkpointing:
        reason = "gradient checkpointing: recompute activations in backward instead of keeping them"
        if apply(
            _with_training(spec, gradient_checkpointing=True),
            "training.gradient_checkpointing",
            False,
            True,
            reason,
        ):
            return FitPlan(True, capacity_bytes, current, spec, changes)
    if training.optimizer == "adamw":
        # 8-bit AdamW keeps Adam's behaviour at a quarter of its state; Adafactor's factored state is
        # smaller still, so it is the choice where 8-bit is missing or not enough.
        choices = [c for c in ("adamw_8bit", "adafactor") if c in optimizers | {"adafactor"}]
        for choice in choices:
            trial = _with_training(spec, optimizer=choice)
            if fits(estimate(trial, arch, device=device), capacity_bytes) or choice == choices[-1]:
                kind = "8-bit" if choice == "adamw_8bit" else "factored"
                reason = f"{kind} optimizer state instead of AdamW's two fp32 moments"
                if apply(trial, "training.optimizer", "adamw", choice, reason):
                    return FitPlan(True, capacity_bytes, current, spec, changes)
                break
    batch, accumulation = spec.training.batch_size, spec.training.gradient_accumulation_steps
    for micro in sorted((m for m in range(1, batch) if batch % m == 0), reverse=True):
        steps = accumulation * batch // micro
        if steps > 64:
            break
        trial = _with_training(spec, batch_size=micro, gradient_accumulation_steps=steps)
        if fits(estimate(trial, arch, device=device), capacity_bytes) or micro == 1:
            reason = (
                f"micro-batches of {micro} with {steps} accumulation steps: "
                f"the same {batch * accumulation} images per optimizer step"
            )
            apply(trial, "training.batch_size", batch, micro, reason)
            accumulated = Change(
                "training.gradient_accumulation_steps", accumulation, steps, reason, current.peak_bytes
            )
            changes.append(accumulated)
            break
    return FitPlan(fits(current, capacity_bytes), capacity_bytes, current, spec, changes)
