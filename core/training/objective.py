"""The denoising objective every method shares: noising, the prediction target, min-SNR weighting.

The tables come from the base's own noise scheduler (`alphas_cumprod`, `prediction_type`), so a
v-prediction base (SD2-768, the tiny bases) trains on velocity and an epsilon base on noise without
the caller saying which. Formulas match diffusers' `DDPMScheduler.add_noise` / `get_velocity`; the
tables are kept on the training device so a step makes no host round trip.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiffusionObjective:
    def __init__(self, noise_scheduler: Any, *, device: torch.device, min_snr_gamma: float | None = None):
        config = noise_scheduler.config
        self.prediction_type: str = config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; use one of {PREDICTION_TYPES}"
            )
        self.num_train_timesteps: int = int(config.num_train_timesteps)
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_alpha = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alpha = (1.0 - alphas_cumprod).sqrt()
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)
        self.min_snr_gamma = min_snr_gamma

    def _coefficients(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (ndim - 1)
        return self.sqrt_alpha[timesteps].view(shape), self.sqrt_one_minus_alpha[timesteps].view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, latents.ndim)
        return (a * latents.float() + s * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefficients(timesteps, latents.ndim)
        return (a * noise.float() - s * latents.float()).to(latents.dtype)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-γ loss weights (Hang et al. 2023) per sample, or None when off.

        For epsilon the weight is min(snr, γ)/snr; for v-prediction the target already carries a
        factor (snr + 1) relative to x0, so the weight is min(snr, γ)/(snr + 1).
        """
        if self.min_snr_gamma is None:
            return None
        snr = self.snr[timesteps]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            # A zero-terminal-SNR schedule has snr = 0 at the last step; its weight is then 0, not NaN.
            return clipped / snr.clamp(min=1e-12)
        return clipped / (snr + 1.0)

    def loss(
        self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        target = self.target(latents, noise, timesteps)
        # The loss is reduced in fp32 even under bf16 autocast: small per-pixel errors would round away.
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
            dim=tuple(range(1, prediction.ndim))
        )
        weights = self.weights(timesteps)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()
