"""Worked request examples in the OpenAPI document: one training job per method, and generations.

They are OpenAPI named examples on the request bodies of `POST /v1/jobs` and `POST /v1/generations`
(Swagger UI at /docs offers them in a drop-down). Each is a complete, valid request, checked in
tests/test_observability.py against `JobSpec` / `GenerationSpec` and through the API itself; with a
dataset id of yours, every job example runs as-is on the built-in tiny bases. Hyper-parameters are
the usual starting points for real SD1.5-class bases.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

DATASET_ID = "ds_019a2b3c4d5e6f7a8b9c0d1e"
LORA_ID = "art_019a2b3c4d5e1f2e3d4c5b6a"
CONTROLNET_ID = "art_019a2b3c4d5f0a1b2c3d4e5f"
IP_ADAPTER_ID = "art_019a2b3c4d601b2c3d4e5f6a"
TEXTUAL_INVERSION_ID = "art_019a2b3c4d612c3d4e5f6a7b"
HYPERNETWORK_ID = "art_019a2b3c4d623d4e5f6a7b8c"
POSE_IMAGE_ID = "img_019a2b3c4d70aabbccddeeff"
STYLE_IMAGE_ID = "img_019a2b3c4d71ffeeddccbbaa"


def _job(summary: str, description: str, params: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    value = {"base_model": "tiny-sd", "dataset_id": DATASET_ID, "params": params, "training": training}
    return {"summary": summary, "description": description, "value": value}


JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "lora": _job(
        "LoRA",
        "Rank-16 adapters on the UNet attention; Min-SNR weighting, a checkpoint and samples every "
        "250 steps. Dataset: images with same-name .txt captions.",
        {"method": "lora", "rank": 16, "alpha": 16, "targets": "attention", "train_text_encoder": False},
        {
            "max_steps": 1000,
            "learning_rate": 1e-4,
            "lr_scheduler": "cosine",
            "warmup_steps": 50,
            "batch_size": 4,
            "min_snr_gamma": 5.0,
            "random_flip": True,
            "checkpoint_every": 250,
            "sample_every": 250,
            "sample_prompts": ["a red cube on a blue background"],
            "seed": 42,
        },
    ),
    "dreambooth": _job(
        "DreamBooth",
        "A subject bound to the identifier 'sks', with prior preservation from 100 class images the "
        "worker generates; fit 'auto' lets Atelier change memory settings (recorded on the job) "
        "where it would not fit the training workers. Dataset: 3-20 instance images.",
        {
            "method": "dreambooth",
            "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of a dog",
            "num_class_images": 100,
            "prior_loss_weight": 1.0,
        },
        {
            "max_steps": 800,
            "learning_rate": 5e-6,
            "batch_size": 1,
            "gradient_checkpointing": True,
            "fit": "auto",
        },
    ),
    "textual_inversion": _job(
        "Textual Inversion",
        "A new token <my-cat> of 4 vectors, started from 'cat'; only its embedding trains. "
        "Dataset: images (captions are not needed).",
        {
            "method": "textual_inversion",
            "placeholder_token": "<my-cat>",
            "initializer_token": "cat",
            "num_vectors": 4,
            "learnable_property": "object",
        },
        {"max_steps": 3000, "learning_rate": 5e-4, "batch_size": 4, "checkpoint_every": 500},
    ),
    "hypernetwork": _job(
        "Hypernetwork",
        "AUTOMATIC1111's layout 1-2-1 with ReLU; the artifact also exports as an A1111 .pt. "
        "Dataset: captioned images.",
        {"method": "hypernetwork", "layer_structure": [1, 2, 1], "activation": "relu", "dropout": 0.0},
        {"max_steps": 2000, "learning_rate": 1e-5, "batch_size": 2},
    ),
    "controlnet": _job(
        "ControlNet",
        "Canny-edge ControlNet: the worker computes edge maps from the images, so the dataset needs "
        "no conditioning/ folder (use conditioning 'provided' to bring your own). Captioned images.",
        {
            "method": "controlnet",
            "conditioning": "canny",
            "canny_low_threshold": 100,
            "canny_high_threshold": 200,
            "proportion_empty_prompts": 0.1,
        },
        {"max_steps": 5000, "learning_rate": 1e-5, "batch_size": 4, "gradient_accumulation_steps": 4},
    ),
    "ip_adapter": _job(
        "IP-Adapter",
        "Image prompt adapter on a frozen CLIP image encoder; image, text or both dropped 5% of the "
        "time each to train guidance. Dataset: captioned images.",
        {"method": "ip_adapter", "drop_image_rate": 0.05, "drop_text_rate": 0.05, "drop_both_rate": 0.05},
        {"max_steps": 2000, "learning_rate": 1e-4, "batch_size": 8, "mixed_precision": "auto"},
    ),
    "hyper_lora": _job(
        "hyper_lora",
        "A network that predicts a rank-4 LoRA from reference images, trained over many concepts. "
        "Dataset: a zip with one folder per concept (at least 4, with 2+ images each). Then a lora job "
        'with init_from {"hyper_lora": <its artifact>, "images": [<1-5 image ids>]} personalises in '
        "seconds: max_steps 0 keeps the prediction, a few steps fine-tune from it.",
        {"method": "hyper_lora", "rank": 4, "targets": "attention+conv+ff", "basis_size": 16},
        {"max_steps": 4000, "learning_rate": 2e-4, "lr_scheduler": "cosine", "batch_size": 8},
    ),
}

GENERATION_EXAMPLES: dict[str, dict[str, Any]] = {
    "composed": {
        "summary": "IP-Adapter + ControlNet + LoRA",
        "description": "A style reference image (IP-Adapter), a pose/edge map (ControlNet) and a LoRA, "
        "composed in one request. Images are ids from POST /v1/images, or data:image/...;base64 URIs.",
        "value": {
            "base_model": "tiny-sd",
            "prompt": "a red cube on a blue background, studio light",
            "negative_prompt": "blurry",
            "steps": 30,
            "guidance_scale": 7.0,
            "scheduler": "dpmpp_2m",
            "seed": 1234,
            "num_images": 2,
            "loras": [{"artifact_id": LORA_ID, "scale": 0.8}],
            "ip_adapter": {"artifact_id": IP_ADAPTER_ID, "image": STYLE_IMAGE_ID, "scale": 0.6},
            "controlnet": [{"artifact_id": CONTROLNET_ID, "image": POSE_IMAGE_ID, "scale": 1.0}],
        },
    },
    "token_and_hypernetwork": {
        "summary": "Textual Inversion token + hypernetwork",
        "description": "A learnt token used in the prompt, with a hypernetwork at 70% strength.",
        "value": {
            "base_model": "tiny-sd",
            "prompt": "a photo of <my-cat> on a sofa",
            "seed": 7,
            "textual_inversions": [{"artifact_id": TEXTUAL_INVERSION_ID}],
            "hypernetwork": {"artifact_id": HYPERNETWORK_ID, "strength": 0.7},
        },
    },
}

BODY_EXAMPLES = {("/v1/jobs", "post"): JOB_EXAMPLES, ("/v1/generations", "post"): GENERATION_EXAMPLES}


def install(app: FastAPI) -> None:
    """Add the examples to the app's OpenAPI document when it is first built."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # caches itself in app.openapi_schema
            for (path, method), examples in BODY_EXAMPLES.items():
                operation = schema.get("paths", {}).get(path, {}).get(method)
                if operation and "requestBody" in operation:
                    operation["requestBody"]["content"]["application/json"]["examples"] = examples
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
