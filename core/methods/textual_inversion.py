"""Textual Inversion (Gal et al. 2022): a new token whose embedding rows are the only thing that trains.

The placeholder becomes `num_vectors` tokens, `tok tok_1 … tok_{n-1}`, the names diffusers'
`load_textual_inversion` gives a multi-vector embedding, so a prompt that says `tok` means the same
thing in training and at generation (the pipelines expand `tok` themselves). Each text encoder's
token lookup is swapped for `ExtendedEmbedding`: the original matrix, frozen and never copied, and a
small [n, dim] parameter for the new ids. Every other weight therefore stays bit-identical, which the
tests check. SDXL trains separate rows in both encoders and saves them as `clip_l` / `clip_g`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from core.errors import MethodInputError
from core.methods.base import Trainable
from core.spec.methods import TextualInversionParams
from core.spec.training import TrainingParams
from core.training.caching import CaptionedImage, TrainingItem, TrainingSet

if TYPE_CHECKING:
    from core.methods.context import ArtifactUse, GenerationContext
    from core.training.progress import TrainingHooks

WEIGHT_NAME = "learned_embeds.safetensors"
# (tokenizer, text encoder) attribute pairs and the key each encoder's rows get in an SDXL file.
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

# Dataset captions are ignored: the token must absorb what the images share, so the surrounding
# words vary and carry nothing about the subject.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {}",
        "a picture of the {}",
        "an image showing a {}",
        "a close-up shot of the {}",
        "a snapshot of my {}",
        "a clear photo of one {}",
        "a well-lit photo of the {}",
        "a cropped picture of a {}",
        "a dim photograph of a {}",
        "the {} in a photo",
        "a small {}",
        "a large {}",
        "{}",
        "a rendering of the {}",
    ),
    "style": (
        "a painting in the style of {}",
        "artwork in the style of {}",
        "an illustration in the style of {}",
        "a picture made in the style of {}",
        "a drawing, {} style",
        "a scene rendered in the style of {}",
        "a landscape in the style of {}",
        "a portrait in the style of {}",
        "a sketch in the style of {}",
        "{} style",
        "an image by {}",
        "a work of art in the manner of {}",
    ),
}


def token_names(token: str, num_vectors: int) -> list[str]:
    """`tok`, `tok_1`, … — diffusers' names for the vectors of a multi-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class ExtendedEmbedding(torch.nn.Module):
    """The original token embedding plus trainable rows for ids >= its vocabulary size.

    Ids below `vocab` read the frozen matrix; the others read `new`. `torch.where` routes gradients
    to `new` only at the placeholder's positions, and nothing copies the full matrix per step.
    """

    def __init__(self, original: torch.nn.Embedding, init: torch.Tensor) -> None:
        super().__init__()
        self.original = original
        self.vocab = original.num_embeddings
        self.new = torch.nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, as diffusers' loader would hold it (for checks, never per step)."""
        return torch.cat([self.original.weight, self.new.to(self.original.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.vocab).unsqueeze(-1)
        old = self.original(input_ids.clamp(max=self.vocab - 1))
        new = self.new.to(old.dtype)[(input_ids - self.vocab).clamp(min=0)]
        return torch.where(is_new, new, old)


class TextualInversionTrainable(Trainable):
    text_encoder_trains = True  # keep token ids: the prompt must be encoded through the new rows

    def __init__(
        self, base: Any, params: TextualInversionParams, training: TrainingParams, *, device: torch.device
    ) -> None:
        super().__init__(base, training, device=device)
        self.params = params
        self.names = token_names(params.placeholder_token, params.num_vectors)
        pairs = [(getattr(base, t), getattr(base, e), e) for t, e in ENCODERS if getattr(base, e) is not None]
        # Check every tokenizer before changing any: a refused job leaves the base untouched.
        for tokenizer, _, _ in pairs:
            vocab = tokenizer.get_vocab()
            for name in self.names:
                if name in vocab:
                    raise MethodInputError(
                        "placeholder_token_exists",
                        f"placeholder token {name!r} is already in the base's vocabulary; choose another",
                    )
        self.encoder_names: list[str] = []
        for tokenizer, encoder, name in pairs:
            self._extend(tokenizer, encoder, params)
            self.add_module(name, encoder)  # follows train()/eval(); its `new` rows are the state
            self.encoder_names.append(name)

    def _extend(self, tokenizer: Any, encoder: Any, params: TextualInversionParams) -> None:
        original = encoder.get_input_embeddings()
        # Same order as diffusers' loader, so the ids (vocab, vocab+1, …) match at generation time.
        tokenizer.add_tokens(self.names)
        ids = tokenizer.convert_tokens_to_ids(self.names)
        if ids != list(range(original.num_embeddings, original.num_embeddings + len(self.names))):
            raise RuntimeError(f"new token ids {ids} do not follow the embedding matrix")
        # A word may be several tokens (byte-level vocabularies): start from their mean.
        init_ids = tokenizer(params.initializer_token, add_special_tokens=False).input_ids
        with torch.no_grad():
            start = original.weight[init_ids].float().mean(dim=0)
        encoder.set_input_embeddings(ExtendedEmbedding(original, start.expand(len(self.names), -1)))

    def embedding(self, encoder_name: str) -> ExtendedEmbedding:
        return getattr(self, encoder_name).get_input_embeddings()

    def training_items(
        self, items: list[CaptionedImage], *, resolution: int, hooks: TrainingHooks
    ) -> TrainingSet:
        # Every vector spelled out: the cached token ids come from the tokenizer alone, without the
        # pipelines' expansion of `tok`. Each use of an image draws one template.
        words = " ".join(self.names)
        captions = tuple(template.format(words) for template in TEMPLATES[self.params.learnable_property])
        return TrainingSet([TrainingItem(item.image, captions) for item in items])

    def save(self, out_dir: Path) -> list[str]:
        rows = {
            name: self.embedding(name).new.detach().to("cpu", torch.float32).contiguous()
            for name in self.encoder_names
        }
        token = self.params.placeholder_token
        tensors = (
            {SDXL_KEYS[n]: t for n, t in rows.items()} if len(rows) > 1 else {token: rows["text_encoder"]}
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"token": token, "num_vectors": str(len(self.names)), "format": "pt"}
        save_file(tensors, out_dir / WEIGHT_NAME, metadata=metadata)
        return [WEIGHT_NAME]

    # `sample` needs no override: the diffusers pipelines expand `tok` into `tok tok_1 …` themselves
    # (TextualInversionLoaderMixin.maybe_convert_prompt), exactly as they will at generation time.


class TextualInversionMethod:
    name: ClassVar[str] = "textual_inversion"
    Params: ClassVar[type[TextualInversionParams]] = TextualInversionParams
    dataset_kind: ClassVar[str] = "images"
    artifact_format: ClassVar[str] = "diffusers"

    def build(
        self, base: Any, params: TextualInversionParams, training: TrainingParams, *, device: torch.device
    ) -> TextualInversionTrainable:
        return TextualInversionTrainable(base, params, training, device=device)

    def apply(
        self, ctx: GenerationContext, artifact_dir: Path, manifest: dict[str, Any], use: ArtifactUse
    ) -> None:
        """`load_textual_inversion` into the cached pipeline; the undo unloads exactly these tokens
        and puts each encoder's embedding module back as it was (same object, same tensor)."""
        pipe = ctx.pipe
        token = manifest["params"]["placeholder_token"]
        state = load_file(artifact_dir / WEIGHT_NAME)
        sdxl = set(state) == set(SDXL_KEYS.values())
        pairs = [(t, e) for t, e in ENCODERS if getattr(pipe, e, None) is not None]
        if sdxl != (len(pairs) == 2):
            raise ValueError(f"{WEIGHT_NAME} holds {sorted(state)}, which does not fit this pipeline")
        for tokenizer_name, encoder_name in pairs:
            tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
            rows = state[SDXL_KEYS[encoder_name]] if sdxl else state[token]
            undo = _unloader(pipe, token_names(token, len(rows)), tokenizer, encoder)
            if sdxl:
                pipe.load_textual_inversion(rows, token=token, tokenizer=tokenizer, text_encoder=encoder)
            else:  # the file itself, through diffusers' own file loading
                pipe.load_textual_inversion(str(artifact_dir), weight_name=WEIGHT_NAME, token=token)
            ctx.undo.append(undo)


def _unloader(pipe: Any, names: list[str], tokenizer: Any, encoder: Any) -> Callable[[], None]:
    """Undo one encoder's load, taken before it. transformers resizes the embedding module in place
    (its weight's `.data` is swapped for a bigger tensor), so the old tensor is kept by reference."""
    module = encoder.get_input_embeddings()
    data, rows, vocab_size = module.weight.data, module.num_embeddings, encoder.config.vocab_size

    def undo() -> None:
        # Removes the tokens from the tokenizer (and builds a smaller matrix we then drop).
        pipe.unload_textual_inversion(tokens=names, tokenizer=tokenizer, text_encoder=encoder)
        # The same module, parameter and storage as before: nothing that refers to them goes stale.
        module.weight.data, module.num_embeddings = data, rows
        encoder.set_input_embeddings(module)
        encoder.config.vocab_size = vocab_size

    return undo
