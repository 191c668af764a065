"""Hypernetwork (AUTOMATIC1111's design): for each cross-attention context width, a pair of small MLPs
that transform the text context before `to_k` and before `to_v`, as `x + mlp(x) * strength`.

The MLPs follow A1111's `HypernetworkModule` exactly (facts from its hypernetwork.py), so the later
A1111 `.pt` export is a rename of our keys: a `torch.nn.Sequential` stored as `linear`, per layer
Linear, then the activation (never after the last Linear unless `activate_output`; "linear" adds no
module), then LayerNorm, then Dropout on hidden layers; A1111's "swish" is `Hardswish`. A1111 also
initialises LayerNorm weights from N(0, 0.01) whatever `weight_init` says; we do the same.

Installation goes through attention processors on the UNet instance, never by patching classes: each
cross-attention module (`attn2`) gets a wrapper that calls its previous processor with a view of the
module whose `to_k` / `to_v` apply the MLPs first. LoRA layers on to_k/to_v and an IP-Adapter
processor (which calls `attn.to_k` on the text part only) therefore compose with it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from core.errors import MethodInputError
from core.methods.base import Trainable
from core.spec.methods import HypernetworkParams
from core.spec.training import TrainingParams

WEIGHT_NAME = "hypernetwork.safetensors"
CONFIG_NAME = "hypernetwork.json"
CONFIG_FIELDS = ("layer_structure", "activation", "layer_norm", "dropout", "weight_init", "activate_output")
ACTIVATIONS: dict[str, type[torch.nn.Module] | None] = {
    "linear": None,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}


class HypernetworkModule(torch.nn.Module):
    """One MLP (the k or the v side of one width) in A1111's layer order and key layout."""

    def __init__(self, width: int, params: HypernetworkParams) -> None:
        super().__init__()
        sizes = [int(width * multiple) for multiple in params.layer_structure]
        if min(sizes) < 1:
            raise MethodInputError(
                "invalid_layer_structure",
                f"layer_structure {params.layer_structure} gives a layer narrower than one unit "
                f"at context width {width}",
            )
        last = len(sizes) - 2
        activation = ACTIVATIONS[params.activation]
        layers: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(torch.nn.Linear(n_in, n_out))
            if activation is not None and (i < last or params.activate_output):
                layers.append(activation())
            if params.layer_norm:
                layers.append(torch.nn.LayerNorm(n_out))
            if params.dropout and i < last:
                layers.append(torch.nn.Dropout(params.dropout))
        self.linear = torch.nn.Sequential(*layers)
        self._initialise(params)

    @torch.no_grad()
    def _initialise(self, params: HypernetworkParams) -> None:
        nonlinearity = "leaky_relu" if params.activation == "leakyrelu" else "relu"
        init = {
            "xavier_uniform": torch.nn.init.xavier_uniform_,
            "xavier_normal": torch.nn.init.xavier_normal_,
            "kaiming_uniform": functools.partial(torch.nn.init.kaiming_uniform_, nonlinearity=nonlinearity),
            "kaiming_normal": functools.partial(torch.nn.init.kaiming_normal_, nonlinearity=nonlinearity),
        }
        for layer in self.linear:
            if not isinstance(layer, torch.nn.Linear | torch.nn.LayerNorm):
                continue
            if params.weight_init == "normal" or isinstance(layer, torch.nn.LayerNorm):
                layer.weight.normal_(0.0, 0.01)
            else:
                init[params.weight_init](layer.weight)
            layer.bias.zero_()

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * strength


class Hypernetwork(torch.nn.ModuleDict):
    """{str(width): {"k": module, "v": module}}; state-dict keys are `{width}.k.linear.0.weight`."""

    def __init__(self, params: HypernetworkParams, widths: list[int]) -> None:
        pairs = {
            str(w): torch.nn.ModuleDict({s: HypernetworkModule(w, params) for s in "kv"}) for w in widths
        }
        super().__init__(pairs)
        self.params, self.widths = params, sorted(widths)

    def config(self) -> dict[str, Any]:
        return {**self.params.model_dump(include=set(CONFIG_FIELDS)), "widths": self.widths}

    def save(self, out_dir: Path) -> list[str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, out_dir / WEIGHT_NAME)
        (out_dir / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")
        return [WEIGHT_NAME, CONFIG_NAME]

    @classmethod
    def load(cls, artifact_dir: Path) -> Hypernetwork:
        config = json.loads((artifact_dir / CONFIG_NAME).read_text())
        params = HypernetworkParams(**{name: config[name] for name in CONFIG_FIELDS})
        hypernetwork = cls(params, [int(w) for w in config["widths"]])
        hypernetwork.load_state_dict(load_file(artifact_dir / WEIGHT_NAME))
        return hypernetwork


def cross_attention_modules(unet: Any) -> dict[str, Any]:
    """The UNet's cross-attention modules (`attn2`) by name; self-attention is left alone."""
    return {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
    }


def context_widths(unet: Any) -> list[int]:
    return sorted({m.cross_attention_dim for m in cross_attention_modules(unet).values()})


class _HyperAttention:
    """The attention module as the wrapped processor sees it: `to_k` / `to_v` transform the context
    first, everything else is the module's own (looked up at call time, so LoRA layers count)."""

    def __init__(self, attn: Any, processor: HypernetworkProcessor) -> None:
        self._attn, self._processor = attn, processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(self._processor.k(context, self._processor.strength))

    def to_v(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(self._processor.v(context, self._processor.strength))


class HypernetworkProcessor:
    """Wraps one attention module's previous processor. Deliberately not an nn.Module: diffusers
    registers module processors as submodules, which would put our weights in the UNet's state."""

    def __init__(self, inner: Any, k: HypernetworkModule, v: HypernetworkModule, strength: float) -> None:
        self.inner, self.k, self.v, self.strength = inner, k, v, strength

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(_HyperAttention(attn, self), *args, **kwargs)


@functools.cache
def _processor_type(inner_type: type) -> type[HypernetworkProcessor]:
    """A HypernetworkProcessor whose `__call__` declares the wrapped processor's parameters:
    `Attention.forward` drops every cross_attention_kwarg (e.g. `ip_adapter_masks`) that its
    processor's signature does not name."""

    try:
        signature = inspect.signature(inner_type.__call__)
    except (TypeError, ValueError):  # not introspectable: kwargs pass only by their own names
        return HypernetworkProcessor

    def __call__(self: HypernetworkProcessor, attn: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return HypernetworkProcessor.__call__(self, attn, *args, **kwargs)

    __call__.__signature__ = signature  # type: ignore[attr-defined]
    return type(f"Hypernetwork{inner_type.__name__}", (HypernetworkProcessor,), {"__call__": __call__})


def install(unet: Any, hypernetwork: Hypernetwork, *, strength: float) -> Callable[[], None]:
    """Wrap every cross-attention processor (the hypernetwork must cover each context width);
    return the undo, which puts back the exact processor objects that were there before."""
    modules = cross_attention_modules(unet)
    missing = {m.cross_attention_dim for m in modules.values()} - set(hypernetwork.widths)
    if missing:
        raise ValueError(
            f"the hypernetwork covers context widths {hypernetwork.widths}, "
            f"the UNet also has {sorted(missing)}"
        )
    previous = dict(unet.attn_processors)
    for attn in modules.values():
        pair = hypernetwork[str(attn.cross_attention_dim)]
        wrapper = _processor_type(type(attn.processor))(attn.processor, pair["k"], pair["v"], strength)
        attn.set_processor(wrapper)
    # set_attn_processor pops entries from the dict it is given: hand it a copy each time.
    return lambda: unet.set_attn_processor(dict(previous))


class HypernetworkTrainable(Trainable):
    def __init__(
        self, base: Any, params: HypernetworkParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        super().__init__(base, training, device=device)
        # Initialised on the CPU, then moved: the same seed gives the same start on every device.
        self.hypernetwork = Hypernetwork(params, context_widths(base.unet)).to(device, torch.float32)
        self.hypernetwork.requires_grad_(True)
        # No undo kept: a job loads its own base, which lives no longer than the job.
        install(base.unet, self.hypernetwork, strength=1.0)

    def save(self, out_dir: Path) -> list[str]:
        return self.hypernetwork.save(out_dir)


class HypernetworkMethod:
    name: ClassVar[str] = "hypernetwork"
    Params: ClassVar[type[HypernetworkParams]] = HypernetworkParams
    dataset_kind: ClassVar[str] = "captioned_images"
    artifact_format: ClassVar[str] = "a1111"  # A1111's module layout, as safetensors + JSON config

    def build(
        self, base: Any, params: HypernetworkParams, training: TrainingParams, *, device: torch.device
    ) -> HypernetworkTrainable:
        return HypernetworkTrainable(base, params, training, device=device)

    def apply(self, ctx: Any, artifact_dir: Path, manifest: dict[str, Any], use: Any) -> None:
        """Install the artifact into `ctx.pipe.unet` at strength `use.scale` until the undo runs."""
        unet = ctx.pipe.unet
        hypernetwork = Hypernetwork.load(artifact_dir).to(unet.device, unet.dtype).eval()
        hypernetwork.requires_grad_(False)
        ctx.undo.append(install(unet, hypernetwork, strength=use.scale))
