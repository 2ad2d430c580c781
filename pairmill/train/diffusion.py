"""Noise schedule, training loss and samplers (the paper's "simple diffusion" recipe).

Conventions (variance preserving): ``z_t = alpha_t * x + sigma_t * eps`` with
``alpha_t**2 + sigma_t**2 = 1`` and ``logSNR(t) = log(alpha_t**2 / sigma_t**2)``.
The model predicts ``v = alpha_t * eps - sigma_t * x``; from it
``x = alpha_t * z - sigma_t * v`` and ``eps = sigma_t * z + alpha_t * v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NOISE_RESOLUTION = 32


@dataclass(frozen=True)
class Schedule:
    """Cosine schedule shifted for resolution (Hoogeboom et al., "simple diffusion").

    ``logSNR(t) = -2 log tan(pi t / 2) + 2 log(noise_resolution / image_size)``: an image
    larger than the noise resolution gets a lower SNR at every t, because averaging over more
    pixels removes noise faster. The unshifted logSNR is clipped to [logsnr_min, logsnr_max]
    so that t = 0 and t = 1 stay finite.

    Args:
      image_size: side of the images being generated.
      noise_resolution: resolution at which the plain cosine schedule applies (paper: 32).
      logsnr_min: lowest unshifted logSNR (t = 1).
      logsnr_max: highest unshifted logSNR (t = 0).
    """

    image_size: int = 32
    noise_resolution: int = NOISE_RESOLUTION
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    @property
    def shift(self) -> float:
        return 2.0 * math.log(self.noise_resolution / self.image_size)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """logSNR at times t in [0, 1] (monotonically decreasing)."""
        t_min = math.atan(math.exp(-0.5 * self.logsnr_max)) / (math.pi / 2)
        t_max = math.atan(math.exp(-0.5 * self.logsnr_min)) / (math.pi / 2)
        t = t_min + t * (t_max - t_min)
        return -2.0 * torch.log(torch.tan(math.pi * t / 2)) + self.shift

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), with alpha^2 = sigmoid(logSNR) and sigma^2 = sigmoid(-logSNR)."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def v_to_eps(v: torch.Tensor, z: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The noise a v prediction implies."""
    return sigma * z + alpha * v


def v_to_x(v: torch.Tensor, z: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The clean image a v prediction implies."""
    return alpha * z - sigma * v


def v_target(x: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The v that the model should predict for clean image x and noise eps."""
    return alpha * eps - sigma * x


def _expand(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1, 1)


def _call(model: Callable, z, t, cond, drop, tokens) -> torch.Tensor:
    """``model(z, t, cond, drop)``, with the patch tokens when there are any (so that models
    without cross-attention keep their four-argument signature)."""
    return model(z, t, cond, drop) if tokens is None else model(z, t, cond, drop, tokens)


def diffusion_loss(
    model: Callable,
    schedule: Schedule,
    x: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    drop: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean epsilon-space MSE of the model's v prediction (the paper's loss).

    Args:
      model: ``model(z, t, cond, drop[, tokens]) -> v``.
      x: clean images in [-1, 1], (B, 3, S, S).
      t: times in [0, 1], (B,); eps: the noise, like x; drop: bool (B,) for the null embedding.
      tokens: the conditioning patch tokens (B, T, W) of a cross-attention model, else None.
    """
    alpha, sigma = (_expand(a) for a in schedule.alpha_sigma(t))
    z = alpha * x + sigma * eps
    v = _call(model, z, t, cond, drop, tokens).float()
    return F.mse_loss(v_to_eps(v, z, alpha, sigma), eps)


def guided_v(
    model: Callable,
    z: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    guidance: float,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guided v.

    ``eps = eps_c + w (eps_c - eps_u)``. Since eps is affine in v for a fixed z
    (eps = sigma z + alpha v), guiding v with the same formula gives exactly that eps, and
    x stays computable at t = 1 where alpha is ~0. With w = 0 the unconditional branch is not
    evaluated at all. The unconditional branch drops the embedding and the tokens together
    (the model substitutes its null embedding and null tokens).
    """
    if guidance == 0:
        return _call(model, z, t, cond, None, tokens).float()
    n = z.shape[0]
    drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    both = None if tokens is None else torch.cat([tokens, tokens])
    v = _call(
        model,
        torch.cat([z, z]),
        torch.cat([t, t]),
        torch.cat([cond, cond]),
        drop.to(z.device),
        both,
    )
    v_c, v_u = v.float().chunk(2)
    return v_c + guidance * (v_c - v_u)


@torch.no_grad()
def sample(
    model: Callable,
    schedule: Schedule,
    cond: torch.Tensor,
    steps: int = 50,
    sampler: str = "ddpm",
    guidance: float = 0.5,
    generator: torch.Generator | None = None,
    interpolation: float = 0.2,
    clip: bool = True,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per row of `cond`; returns images in [-1, 1], (B, 3, S, S).

    Args:
      model: ``model(z, t, cond, drop[, tokens]) -> v``.
      cond: conditioning embeddings (B, D), on the model's device.
      steps: number of denoising steps (uniform in t from 1 to 0).
      sampler: "ddpm" (ancestral) or "ddim" (deterministic).
      guidance: classifier-free guidance weight w (0: conditional model only).
      generator: a CPU generator; all noise is drawn from it, so seeded runs repeat exactly.
      interpolation: DDPM only: gamma of the step variance (see `_ddpm_step`).
      clip: clip the predicted clean image to [-1, 1] at each step.
      tokens: the conditioning images' patch tokens (B, T, W) for a cross-attention model.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device, b, s = cond.device, cond.shape[0], schedule.image_size
    z = torch.randn((b, 3, s, s), generator=generator).to(device)
    # Coefficients in float64 on the host: they are scalars per step, and expm1 near
    # t = 0 needs the precision.
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    lams = schedule.logsnr(times)
    x = z
    for i in range(steps):
        lam_t, lam_s = lams[i], lams[i + 1]
        a_t, s_t = float(torch.sigmoid(lam_t).sqrt()), float(torch.sigmoid(-lam_t).sqrt())
        t = torch.full((b,), float(times[i]), device=device)
        v = guided_v(model, z, t, cond, guidance, tokens)
        x = v_to_x(v, z, a_t, s_t)
        if clip:
            x = x.clamp(-1, 1)
        if i == steps - 1:
            break  # the last step's clean prediction is the sample
        if sampler == "ddim":
            eps = (z - a_t * x) / s_t  # consistent with the (clipped) x
            a_s, s_s = float(torch.sigmoid(lam_s).sqrt()), float(torch.sigmoid(-lam_s).sqrt())
            z = a_s * x + s_s * eps
        else:
            z = _ddpm_step(z, x, lam_t, lam_s, interpolation, generator)
    return x


def _ddpm_step(z, x, lam_t, lam_s, gamma: float, generator) -> torch.Tensor:
    """One ancestral step z_t -> z_s (s < t) given the predicted clean image x.

    The mean is that of the posterior q(z_s | z_t, x). With c = 1 - exp(lam_t - lam_s), the
    posterior variance is c sigma_s^2 (the lower bound) and the forward transition variance
    sigma_{t|s}^2 = c sigma_t^2 (the upper bound, DDPM's beta). The log-variance interpolates
    between them: ``gamma * log(c sigma_t^2) + (1 - gamma) * log(c sigma_s^2)``, so gamma
    weights the *forward* (upper) variance and 1 - gamma the posterior (lower) one; the
    paper's "interpolation 0.2" is gamma = 0.2 (0: posterior variance, 1: forward variance).

    This is the reading of the Google samplers the paper's recipe comes from: the logSNR
    ("simple diffusion"/VDM-style) sampler of google-research's ``diffusion_distillation``
    (``dpm.py``, ``diffusion_reverse`` with ``x_logvar="medium:<frac>"``) sets
    ``logvar = frac * max_logvar + (1 - frac) * min_logvar`` with max the forward and min the
    posterior log-variance, exactly as here; Ho & Salimans' classifier-free guidance paper
    samples with the same form, ``(posterior var)^(1 - v) * (forward var)^v`` (v = 0.3
    there); both follow Nichol & Dhariwal's learned interpolation, whose v = 1 is beta_t.
    """
    c = float(-torch.expm1(lam_t - lam_s))
    a_t, a_s = float(torch.sigmoid(lam_t).sqrt()), float(torch.sigmoid(lam_s).sqrt())
    var_t, var_s = float(torch.sigmoid(-lam_t)), float(torch.sigmoid(-lam_s))
    mean = a_s * ((1 - c) / a_t * z + c * x)
    log_var = math.log(c) + gamma * math.log(var_t) + (1 - gamma) * math.log(var_s)
    noise = torch.randn(z.shape, generator=generator).to(z.device)
    return mean + math.exp(0.5 * log_var) * noise
