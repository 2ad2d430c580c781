"""The companion trainer: a small pixel-space diffusion model conditioned on pair embeddings.

Modules: `model` (the DiT-style denoiser and its size registry), `diffusion` (schedule,
loss, samplers), `loop` (data stream, training, checkpoints), `sample` (variations grid),
`metrics` (FID, precision/recall, copy-rate, alignment). Importing this package does not
import torch; the modules do.
"""
