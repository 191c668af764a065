"""IP-Adapter (Ye et al. 2023): generation guided by a reference image through decoupled cross-attention.

A frozen CLIP image encoder embeds each training image once (cached by the loop as
`batch.image_features`). What trains is the original "ImageProjModel" (Linear to N context tokens +
LayerNorm) and, in every cross-attention layer, `to_k_ip` / `to_v_ip` started from that layer's
`to_k` / `to_v`: out = attn(q, K_text, V_text) + scale * attn(q, K_ip, V_ip).

Training runs diffusers' own inference machinery (IPAdapterAttnProcessor2_0 on the UNet instance,
`encoder_hid_proj` = MultiIPAdapterImageProjection), so the artifact is computed exactly as
`load_ip_adapter` will compute it. Guidance dropout per sample: no image (zero embeds, as the
pipelines' unconditional branch), no text (the empty prompt), or neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from core.errors import MethodInputError
from core.methods.base import SAMPLE_STEPS, Trainable
from core.spec.methods import IPAdapterParams
from core.spec.training import TrainingParams
from core.training.caching import Batch, CaptionedImage, TrainingSet

if TYPE_CHECKING:
    from core.methods.context import ArtifactUse, GenerationContext
    from core.training.progress import TrainingHooks

WEIGHT_NAME = "ip_adapter.safetensors"
ENCODER_CONFIG = ("projection_dim", "hidden_size", "image_size", "patch_size", "num_hidden_layers")


def load_image_encoder(path: Path | None, **kwargs: Any) -> CLIPVisionModelWithProjection:
    if path is None:
        raise MethodInputError(
            "image_encoder_missing",
            "IP-Adapter needs a CLIP image encoder for this base: set ATELIER_IMAGE_ENCODER to a "
            "CLIPVisionModelWithProjection folder (e.g. h94/IP-Adapter models/image_encoder)",
        )
    return CLIPVisionModelWithProjection.from_pretrained(path, **kwargs).requires_grad_(False).eval()


def feature_extractor(encoder: CLIPVisionModelWithProjection) -> CLIPImageProcessor:
    # The one diffusers' load_ip_adapter makes when the pipeline has none.
    size = encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


class IPAdapterTrainable(Trainable):
    def __init__(
        self, base: Any, params: IPAdapterParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        super().__init__(base, training, device=device)
        self.params = params
        self.encoder_path = base.image_encoder_path
        self.image_encoder = load_image_encoder(self.encoder_path)
        self.feature_extractor = feature_extractor(self.image_encoder)
        self.unet = base.unet
        self.reference: Image.Image | None = None  # sample() guides with the first training image
        self._install(base.unet, params.num_tokens)

    @torch.no_grad()
    def _install(self, unet: Any, num_tokens: int) -> None:
        """diffusers' IP-Adapter processors on every cross-attention layer, others kept as they are."""
        procs: dict[str, Any] = {}
        for name, proc in unet.attn_processors.items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if attn.is_cross_attention:
                proc = IPAdapterAttnProcessor2_0(
                    attn.to_k.out_features, attn.to_k.in_features, num_tokens=(num_tokens,), scale=1.0
                )
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            procs[name] = proc
        unet.set_attn_processor(procs)
        projection = ImageProjection(
            image_embed_dim=self.image_encoder.config.projection_dim,
            cross_attention_dim=unet.config.cross_attention_dim,
            num_image_text_embeds=num_tokens,
        )
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
        unet.config.encoder_hid_dim_type = "ip_image_proj"  # what load_ip_adapter sets, too

    # --- data -----------------------------------------------------------------------------------
    def training_items(
        self, items: list[CaptionedImage], *, resolution: int, hooks: TrainingHooks
    ) -> TrainingSet:
        if items:
            self.reference = items[0].image.convert("RGB")
        return super().training_items(items, resolution=resolution, hooks=hooks)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        if self.reference is None and images:
            self.reference = images[0]
        self.image_encoder.to(self.unet.device)
        pixels = self.feature_extractor(images, return_tensors="pt").pixel_values
        return self.image_encoder(pixels.to(self.unet.device)).image_embeds.float()

    # --- training -------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.image_features is None:
            raise ValueError("IP-Adapter batches need image_features (the loop caches them)")
        hidden, added = self.conditioning(batch)
        embeds = batch.image_features
        if batch.drop is not None:
            embeds, hidden, added = self._dropout(batch, embeds, hidden, added)
        added = {**(added or {}), "image_embeds": [embeds[:, None]]}  # one adapter, one image each
        noisy = self.objective.add_noise(batch.latents, batch.noise, batch.timesteps)
        prediction = self.unet(
            noisy, batch.timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added
        ).sample
        return self.objective.loss(prediction, batch.latents, batch.noise, batch.timesteps)

    def _dropout(
        self, batch: Batch, embeds: torch.Tensor, hidden: torch.Tensor, added: dict[str, Any] | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
        """Per-sample guidance dropout: [0, a) image, [a, a+t) text, [a+t, a+t+b) both."""
        p, drop = self.params, batch.drop
        image_end = p.drop_image_rate
        text_end = image_end + p.drop_text_rate
        both_end = text_end + p.drop_both_rate
        no_image = (drop < image_end) | ((drop >= text_end) & (drop < both_end))
        no_text = (drop >= image_end) & (drop < both_end)
        embeds = embeds.masked_fill(no_image[:, None], 0.0)
        if p.drop_text_rate + p.drop_both_rate > 0:
            if batch.uncond_hidden_states is None:
                raise ValueError("text dropout needs batch.uncond_hidden_states (the empty prompt)")
            empty = batch.uncond_hidden_states.to(hidden.dtype).expand_as(hidden)
            hidden = torch.where(no_text[:, None, None], empty, hidden)
            if added is not None:
                pooled = added["text_embeds"]
                empty_pooled = batch.uncond_pooled_embeds.to(pooled.dtype).expand_as(pooled)
                added = {**added, "text_embeds": torch.where(no_text[:, None], empty_pooled, pooled)}
        return embeds, hidden, added

    # --- artifact -------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The original IP-Adapter layout: `image_proj.*` and `ip_adapter.<i>.*`, where i is the
        processor's position among all attention processors (self-attention ones hold nothing)."""
        projection = self.unet.encoder_hid_proj.image_projection_layers[0]
        state = {
            "image_proj.proj.weight": projection.image_embeds.weight,
            "image_proj.proj.bias": projection.image_embeds.bias,
            "image_proj.norm.weight": projection.norm.weight,
            "image_proj.norm.bias": projection.norm.bias,
        }
        for index, proc in enumerate(self.unet.attn_processors.values()):
            if isinstance(proc, IPAdapterAttnProcessor2_0):
                state[f"ip_adapter.{index}.to_k_ip.weight"] = proc.to_k_ip[0].weight
                state[f"ip_adapter.{index}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    def save(self, out_dir: Path) -> list[str]:
        config = self.image_encoder.config
        # The adapter only works with the encoder it was trained on (a ViT-H adapter fails on bigG
        # with shape errors, or silently on another encoder of the same width): record which.
        encoder = {"folder": f"{self.encoder_path.parent.name}/{self.encoder_path.name}"}
        encoder |= {key: getattr(config, key) for key in ENCODER_CONFIG}
        metadata = {
            "format": "pt",
            "num_tokens": str(self.params.num_tokens),
            "image_encoder": json.dumps(encoder),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.state(), out_dir / WEIGHT_NAME, metadata=metadata)
        return [WEIGHT_NAME]

    # --- samples --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], *, seed: int, size: int) -> list[Any]:
        pipe = self.pipeline()
        self.image_encoder.to(self.unet.device)
        pipe.register_modules(image_encoder=self.image_encoder, feature_extractor=self.feature_extractor)
        pipe.set_progress_bar_config(disable=True)
        reference = self.reference or Image.new("RGB", (size, size), (128, 128, 128))
        generator = torch.Generator(self.unet.device).manual_seed(seed)
        return pipe(
            prompts,
            ip_adapter_image=reference,
            num_inference_steps=SAMPLE_STEPS,
            generator=generator,
            height=size,
            width=size,
        ).images


class IPAdapterMethod:
    name: ClassVar[str] = "ip_adapter"
    Params: ClassVar[type[IPAdapterParams]] = IPAdapterParams
    dataset_kind: ClassVar[str] = "captioned_images"
    artifact_format: ClassVar[str] = "diffusers"

    def build(
        self, base: Any, params: IPAdapterParams, training: TrainingParams, *, device: torch.device
    ) -> IPAdapterTrainable:
        return IPAdapterTrainable(base, params, training, device=device)

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        """`load_ip_adapter` the artifact at `use.scale`, guided by `use.image`; the undo puts back
        the very processors, projection, image encoder and feature extractor the pipeline had."""
        if use.image is None:
            raise MethodInputError("ip_adapter_image_missing", "an IP-Adapter needs a reference image")
        pipe, unet = ctx.pipe, ctx.pipe.unet
        before = {
            "procs": dict(unet.attn_processors),
            "hid_proj": unet.encoder_hid_proj,
            "hid_type": unet.config.encoder_hid_dim_type,
            "image_encoder": getattr(pipe, "image_encoder", None),
            "feature_extractor": getattr(pipe, "feature_extractor", None),
        }

        def undo() -> None:
            pipe.unload_ip_adapter()
            unet.set_attn_processor(dict(before["procs"]))
            unet.encoder_hid_proj = before["hid_proj"]
            unet.config.encoder_hid_dim_type = before["hid_type"]
            pipe.register_modules(
                image_encoder=before["image_encoder"], feature_extractor=before["feature_extractor"]
            )
            ctx.call_kwargs.pop("ip_adapter_image", None)

        ctx.undo.append(undo)  # first, so a failed load below is undone as well
        if before["image_encoder"] is None:
            encoder = load_image_encoder(ctx.image_encoder_path, dtype=pipe.dtype).to(pipe.device)
            pipe.register_modules(image_encoder=encoder)
        with safe_open(artifact_dir / WEIGHT_NAME, "pt") as handle:
            width = handle.get_slice("image_proj.proj.weight").get_shape()[1]
        if pipe.image_encoder.config.projection_dim != width:  # else a shape error mid-generation
            raise MethodInputError(
                "image_encoder_mismatch",
                f"the adapter was trained on a {width}-wide image encoder; this base's gives "
                f"{pipe.image_encoder.config.projection_dim}",
            )
        pipe.load_ip_adapter(
            str(artifact_dir), subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None
        )
        pipe.set_ip_adapter_scale(use.scale)
        ctx.call_kwargs["ip_adapter_image"] = use.image
