"""hyper_lora: a network that predicts a LoRA from reference images (after HyperDreamBooth, Ruiz et
al. 2023), trained across many concepts so that a new concept gets its LoRA in one forward pass.

The frozen image encoder IP-Adapter uses turns an image into tokens (each token: its patch
embedding beside the encoder's last hidden state, see `ReferenceEncoder`); `HyperLoraNetwork` mixes
them (one transformer layer, mean-pooled) and predicts, for every attention projection of the
UNet (the `lora` method's "attention" targets), coefficients over a learned per-layer basis of
low-rank factors: A = sum_k a_k A_k, B = sum_k b_k B_k. A basis keeps the heads small on real-size UNets
(a direct head would need rank x (in + out) outputs per layer) and, with the B basis at zero, the
predicted LoRA starts as "no change", as a fresh LoRA does.

Training is HyperDreamBooth's: each image is its own reference, and the diffusion loss on that
image flows through the predicted LoRA into the network. The LoRA is applied functionally, by
forward hooks on this UNet instance's projection layers, because every sample of a batch carries
its own LoRA (peft layers hold one weight per adapter). The factors use peft's layout and scale
(delta = alpha / rank * B A x), so a prediction is copied unchanged into an ordinary `lora` job's
adapters (core/methods/personalise.py).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import MethodInputError
from core.methods.base import Trainable
from core.methods.ip_adapter import ENCODER_CONFIG, feature_extractor, load_image_encoder
from core.methods.lora import unet_targets
from core.spec.methods import (
    HYPER_LORA_FEATURES,
    MIN_CONCEPTS,
    MIN_IMAGES_PER_CONCEPT,
    HyperLoraParams,
    concept_of,
)
from core.spec.training import TrainingParams
from core.training.caching import Batch, CaptionedImage, TrainingItem, TrainingSet

if TYPE_CHECKING:
    from core.methods.context import ArtifactUse, GenerationContext
    from core.training.progress import TrainingHooks

WEIGHT_NAME = "hyper_lora.safetensors"
MIX_HEADS = 4  # attention heads of the token mixer; params.py keeps hidden_dim a multiple of it


@dataclass(frozen=True)
class LoraLayer:
    """One UNet layer the network predicts a LoRA for, by its module name in the UNet. Convolutions
    get peft's conv LoRA: A is a conv with the layer's kernel, stride and padding; B is 1x1."""

    name: str
    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None  # None: a linear layer
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def a_width(self) -> int:
        """Inputs of one row of A (flattened like the conv weight: in x kh x kw)."""
        kh, kw = self.kernel or (1, 1)
        return self.in_features * kh * kw

    def peft_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of peft's lora_A / lora_B weights for this layer."""
        if self.kernel is None:
            return (rank, self.in_features), (self.out_features, rank)
        return (rank, self.in_features, *self.kernel), (self.out_features, rank, 1, 1)


@dataclass(frozen=True)
class HyperLoraConfig:
    """Everything needed to rebuild the network from its artifact, and the layout it predicts for."""

    token_dim: int
    hidden_dim: int
    basis_size: int
    rank: int
    alpha: float
    instance_prompt: str
    layers: tuple[LoraLayer, ...]
    # What the network reads of the encoder (ReferenceEncoder.tokens); artifacts written before
    # patch embeddings were added read the last hidden state alone.
    features: tuple[str, ...] = ("last_hidden_state",)
    # The parametrisation that keeps the predicted LoRA's steps those of a LoRA at the same lr (see
    # HyperLoraNetwork); artifacts written before it read without it.
    fan_in_scaled: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HyperLoraConfig:
        data = json.loads(text)
        layers = []
        for layer in data["layers"]:
            kernel = layer.pop("kernel")
            kernel = tuple(kernel) if kernel else None
            stride, padding = tuple(layer.pop("stride")), tuple(layer.pop("padding"))
            layers.append(LoraLayer(**layer, kernel=kernel, stride=stride, padding=padding))  # type: ignore[arg-type]
        if "features" in data:  # absent from older artifacts: the field's default is what they read
            data["features"] = tuple(data["features"])
        return cls(**{**data, "layers": tuple(layers)})


def lora_layout(unet: torch.nn.Module, targets: str) -> tuple[LoraLayer, ...]:
    """The layers peft selects on this UNet for the `lora` method's `targets`, in module order."""
    suffixes = tuple(f".{t}" for t in unet_targets(targets))
    layers = []
    for name, module in unet.named_modules():
        if not name.endswith(suffixes):
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append(LoraLayer(name, module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1):
            kernel, stride, padding = module.kernel_size, module.stride, module.padding
            assert isinstance(padding, tuple)  # UNet convs pad by numbers, never "same"
            layers.append(
                LoraLayer(name, module.in_channels, module.out_channels, kernel, stride, padding)  # type: ignore[arg-type]
            )
        else:
            raise ValueError(f"{name}: a {type(module).__name__} cannot take a predicted LoRA")
    return tuple(layers)


class HyperLoraNetwork(torch.nn.Module):
    """Image tokens (B, T, token_dim) -> per layer (A (B, rank, in [x kh x kw]), B (B, out, rank)).

    Adam moves every weight by about the learning rate per step, whatever its gradient's size, so a
    step moves a predicted factor by as much as its fan-in adds up: a coefficient by up to lr x
    |pooled|_1 (hidden_dim terms), a factor by lr x sum_k |c_k| (basis_size terms), and the LoRA is
    the product of two such factors. Plain (hidden 128, basis 16), at lr 2e-3 with batch 1 on
    tiny-sd the predicted LoRA grew until the UNet's output was noise (loss 0.75 over steps
    51-150, a B A entry of 159 at step 150) and went NaN at step 258, while the pooled features,
    an un-normalised residual stream, grew from rms 0.7 to 4-6. With `fan_in_scaled` (every new
    network) the pooled features are layer-normalised, and the coefficient heads and the basis mix
    are scaled by 1/sqrt(fan-in) with their weights initialised larger by as much, so the
    multipliers change the size of a step, not the start. The same run then stays finite for its
    1000 steps (loss 0.26 over steps 51-150, 0.15 over the last 250; B A entries below 1.3);
    tests/test_divergence.py keeps the check.
    """

    def __init__(self, config: HyperLoraConfig) -> None:
        super().__init__()
        self.config = config
        hidden, basis, rank = config.hidden_dim, config.basis_size, config.rank
        self.norm = torch.nn.LayerNorm(config.token_dim)
        self.embed = torch.nn.Linear(config.token_dim, hidden)
        self.mixer = torch.nn.TransformerEncoderLayer(
            hidden, MIX_HEADS, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        scaled = config.fan_in_scaled
        self.head_scale = hidden**-0.5 if scaled else 1.0
        self.basis_scale = basis**-0.5 if scaled else 1.0
        self.coefficients = torch.nn.Linear(hidden, len(config.layers) * 2 * basis)
        with torch.no_grad():
            self.coefficients.weight.div_(self.head_scale)
        # Gaussian A basis like peft's init; zero B basis: the first prediction changes nothing.
        self.basis_a = torch.nn.ParameterList(
            torch.nn.Parameter(
                torch.randn(basis, rank, layer.a_width) / (layer.a_width**0.5 * self.basis_scale)
            )
            for layer in config.layers
        )
        self.basis_b = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(basis, layer.out_features, rank)) for layer in config.layers
        )

    def forward(self, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pooled = self.mixer(self.embed(self.norm(tokens))).mean(dim=1)
        if self.config.fan_in_scaled:
            # No affine: the coefficient heads that follow are affine already.
            pooled = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
        coeffs = self.coefficients(pooled * self.head_scale).view(len(tokens), len(self.config.layers), 2, -1)
        factors = {}
        for i, layer in enumerate(self.config.layers):
            a = torch.einsum("bk,kri->bri", coeffs[:, i, 0], self.basis_a[i]) * self.basis_scale
            b = torch.einsum("bk,kor->bor", coeffs[:, i, 1], self.basis_b[i]) * self.basis_scale
            factors[layer.name] = (a, b)
        return factors


class FunctionalLora:
    """Forward hooks that add scale * B (A x) to each layer's output, A and B per sample.

    Installed on one UNet instance and active only inside `applied`, so the same UNet serves plain
    (no LoRA) calls in between. A batch of one LoRA applies to every sample (classifier-free
    guidance doubles the batch the pipeline runs)."""

    def __init__(self, unet: torch.nn.Module, config: HyperLoraConfig) -> None:
        self.scale = config.scale
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handles = [
            unet.get_submodule(layer.name).register_forward_hook(self._hook(layer)) for layer in config.layers
        ]

    def _hook(self, layer: LoraLayer) -> Any:
        def add_lora(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            if self.factors is None:
                return None
            a, b = self.factors[layer.name]
            x = inputs[0]
            n = x.shape[0]
            if a.shape[0] != n:
                if a.shape[0] != 1:
                    raise ValueError(f"{a.shape[0]} predicted LoRAs for a batch of {n}")
                a, b = a.expand(n, -1, -1), b.expand(n, -1, -1)
            a, b = a.to(x.dtype), b.to(x.dtype)
            if layer.kernel is None:
                flat = x.reshape(n, -1, x.shape[-1])
                delta = ((flat @ a.transpose(1, 2)) @ b.transpose(1, 2)).reshape(output.shape)
            else:
                # One grouped convolution runs every sample's own A: the batch becomes the groups.
                rank = a.shape[1]
                weight = a.reshape(n * rank, layer.in_features, *layer.kernel)
                down = torch.nn.functional.conv2d(
                    x.reshape(1, -1, *x.shape[2:]),
                    weight,
                    stride=layer.stride,
                    padding=layer.padding,
                    groups=n,
                )
                delta = torch.einsum("nrhw,nor->nohw", down.reshape(n, rank, *down.shape[2:]), b)
            return output + self.scale * delta.to(output.dtype)

        return add_lora

    @contextlib.contextmanager
    def applied(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        self.factors = factors
        try:
            yield
        finally:
            self.factors = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ReferenceEncoder:
    """The frozen image encoder's view of reference images: per token, `features` side by side.

    The last hidden state alone says what the transformer makes of an image, but a CLIP ViT's first
    LayerNorm has already divided each patch embedding by its own size, so a colour's intensity
    survives only as a faint ratio to the position embedding: on the tiny base's encoder, held-out
    magenta's prediction came out nearer purple at two of four training seeds. The patch embeddings
    before that LayerNorm are a linear function of the pixels and keep it; with them every seed's
    predictions were specific (tests/test_hyper_lora_held_out.py has the numbers).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.model = load_image_encoder(path)
        self.processor = feature_extractor(self.model)

    def token_dim(self, features: tuple[str, ...]) -> int:
        return len(features) * int(self.model.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        assert self.path is not None  # load_image_encoder refused a missing one
        config = self.model.config
        return {"folder": f"{self.path.parent.name}/{self.path.name}"} | {
            key: getattr(config, key) for key in ENCODER_CONFIG
        }

    @torch.no_grad()
    def tokens(
        self, images: list[Image.Image], device: torch.device, features: tuple[str, ...]
    ) -> torch.Tensor:
        """(n, tokens, len(features) x width)."""
        self.model.to(device)
        pixels = self.processor([i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        pixels = pixels.to(device, self.model.dtype)
        parts = []
        for feature in features:
            # Patch embeddings come with the class and position embeddings, as the encoder adds them.
            if feature == "patch_embeddings":
                parts.append(self.model.vision_model.embeddings(pixels))
            elif feature == "last_hidden_state":
                parts.append(self.model(pixels).last_hidden_state)
            else:
                raise ValueError(f"unknown image feature {feature!r}")
        return torch.cat(parts, dim=-1).float()


def concept_counts(items: list[Any]) -> Counter[str | None]:
    return Counter(concept_of(getattr(item, "name", "") or "") for item in items)


class HyperLoraTrainable(Trainable):
    def __init__(
        self, base: Any, params: HyperLoraParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        super().__init__(base, training, device=device)
        self.params = params
        self.encoder = ReferenceEncoder(base.image_encoder_path)
        self.unet = base.unet
        self.config = HyperLoraConfig(
            token_dim=self.encoder.token_dim(HYPER_LORA_FEATURES),
            hidden_dim=params.hidden_dim,
            basis_size=params.basis_size,
            rank=params.rank,
            alpha=params.effective_alpha,
            instance_prompt=params.instance_prompt,
            layers=lora_layout(base.unet, params.targets),
            features=HYPER_LORA_FEATURES,
            fan_in_scaled=True,
        )
        self.network = HyperLoraNetwork(self.config)
        self.lora = FunctionalLora(base.unet, self.config)
        self.reference: Image.Image | None = None  # sample() predicts from the first training image

    def training_items(
        self, items: list[CaptionedImage], *, resolution: int, hooks: TrainingHooks
    ) -> TrainingSet:
        counts = concept_counts(items)
        concepts = {c: n for c, n in counts.items() if c is not None}
        if None in counts or len(concepts) < MIN_CONCEPTS or min(concepts.values()) < MIN_IMAGES_PER_CONCEPT:
            raise MethodInputError(
                "dataset_unsuitable",
                f"hyper_lora needs images in at least {MIN_CONCEPTS} concept folders with at least "
                f"{MIN_IMAGES_PER_CONCEPT} images each, none at the top level; this dataset has "
                f"{len(concepts)} folders and {counts.get(None, 0)} top-level images",
            )
        if items:
            self.reference = items[0].image.convert("RGB")
        prompt = self.params.instance_prompt
        return TrainingSet([TrainingItem(item.image, (item.caption or prompt,)) for item in items])

    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        return self.encoder.tokens(images, self.unet.device, self.config.features)

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.image_features is None:
            raise ValueError("hyper_lora batches need image_features (the loop caches them)")
        with self.lora.applied(self.network(batch.image_features.float())):
            return super().forward(batch)

    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, size: int) -> list[Any]:
        reference = self.reference or Image.new("RGB", (size, size), (128, 128, 128))
        factors = self.network(self.encoder.tokens([reference], self.unet.device, self.config.features))
        with self.lora.applied(factors):
            return super().sample(prompts, seed=seed, size=size)

    def save(self, out_dir: Path) -> list[str]:
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.network.state_dict().items()
        }
        metadata = {
            "format": "pt",
            "config": self.config.to_json(),
            "image_encoder": json.dumps(self.encoder.describe()),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, out_dir / WEIGHT_NAME, metadata=metadata)
        return [WEIGHT_NAME]


def load_network(artifact_dir: Path) -> tuple[HyperLoraNetwork, dict[str, Any]]:
    """The trained network (fp32, CPU, eval) and the image encoder it was trained on."""
    with safe_open(artifact_dir / WEIGHT_NAME, "pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    network = HyperLoraNetwork(HyperLoraConfig.from_json(metadata["config"]))
    network.load_state_dict(state)
    return network.eval().requires_grad_(False), json.loads(metadata["image_encoder"])


class HyperLoraMethod:
    name: ClassVar[str] = "hyper_lora"
    Params: ClassVar[type[HyperLoraParams]] = HyperLoraParams
    dataset_kind: ClassVar[str] = "concept_images"
    artifact_format: ClassVar[str] = "atelier"

    def build(
        self, base: Any, params: HyperLoraParams, training: TrainingParams, *, device: torch.device
    ) -> HyperLoraTrainable:
        return HyperLoraTrainable(base, params, training, device=device)

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        raise MethodInputError(
            "artifact_not_applicable",
            "a hyper_lora artifact predicts LoRAs: create a lora job with init_from "
            '{"hyper_lora": ..., "images": [...]} and generate with the LoRA it makes',
        )
