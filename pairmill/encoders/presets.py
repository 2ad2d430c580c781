"""Encoder presets: which model, how to preprocess for it, and its default similarity band.

Pure data: importing this module must not import torch, so the CLI can list presets and
validate flags before any heavy dependency loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from pairmill.errors import ConfigError

# Normalisation constants, copied from timm/open_clip so reading them needs neither.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Hub file names. timm repos hold `model.safetensors` (and often `pytorch_model.bin`);
# open_clip repos hold `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`
# (timm/models/_hub.py and open_clip/constants.py). Safetensors first: no pickle at all.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class EncoderPreset:
    """A frozen image encoder and everything needed to feed it and threshold its output.

    Args:
      name: preset name used on the command line, e.g. "dinov2-vitb14".
      family: "timm", "open_clip" or "tiny".
      arch: timm model name or open_clip model name.
      pretrained_tag: timm tag ("lvd142m") or open_clip pretrained tag ("openai", "webli").
      image_size: square crop size fed to the model.
      resize_size: shorter side after resizing, before the center crop.
      interpolation: PIL resampling filter name for the resize.
      mean: per-channel RGB mean in [0, 1] units.
      std: per-channel RGB std in [0, 1] units.
      low: default lower bound of the kept cosine-similarity band.
      high: default upper bound of the kept cosine-similarity band.
      embed_dim: length of the global embedding.
      description: one line for `--help` and run metadata.
      resize_mode: "shortest" (resize shorter side, center crop) or "squash" (resize both
        sides to image_size, no crop; what SigLIP was trained with).
      hub_repo: Hugging Face repo id holding the weights ("" for none).
      hub_files: candidate file names in hub_repo, most preferred first.
      patch_size: the ViT's patch side in pixels (its patch tokens form a
        (image_size // patch_size)-square grid).
    """

    name: str
    family: str
    arch: str
    pretrained_tag: str
    image_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    low: float
    high: float
    embed_dim: int
    description: str
    resize_mode: str = "shortest"
    hub_repo: str = ""
    hub_files: tuple[str, ...] = ()
    patch_size: int = 16

    @property
    def token_grid(self) -> int:
        """Side of the square grid of patch tokens (build --store-tokens)."""
        return self.image_size // self.patch_size


def _dinov2(size: str, width: int, label: str) -> EncoderPreset:
    arch = f"vit_{size}_patch14_dinov2"
    return EncoderPreset(
        name=f"dinov2-vit{size[0]}14",
        family="timm",
        arch=arch,
        pretrained_tag="lvd142m",
        image_size=224,
        # DINOv2's eval transform: Resize(256) + CenterCrop(224), i.e. crop_pct 0.875.
        resize_size=256,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        low=0.3,
        high=0.9,
        embed_dim=width,
        description=f"DINOv2 {label} (timm {arch}.lvd142m), CLS token at 224 px",
        # From timm's pretrained_cfg for f"{arch}.lvd142m" (hf_hub_id).
        hub_repo=f"timm/{arch}.lvd142m",
        hub_files=TIMM_HUB_FILES,
        patch_size=14,
    )


def _clip(
    name: str, arch: str, timm_name: str, width: int, label: str, patch: int
) -> EncoderPreset:
    return EncoderPreset(
        name=name,
        family="open_clip",
        arch=arch,
        pretrained_tag="openai",
        image_size=224,
        resize_size=224,
        interpolation="bicubic",
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        low=0.65,
        high=0.9,
        embed_dim=width,
        description=f"OpenAI CLIP {label} (open_clip {arch}, pretrained='openai'), image embedding",
        # open_clip get_pretrained_cfg(arch, "openai")["hf_hub"] == f"timm/{timm_name}.openai/".
        hub_repo=f"timm/{timm_name}.openai",
        hub_files=OPEN_CLIP_HUB_FILES,
        patch_size=patch,
    )


# The tiny encoder's random weights are not semantic; its band only has to split pairs of real
# photos on both sides for the demo and tests. Measured with seed 0 on 16 photos (skimage:
# astronaut chelsea coffee camera rocket immunohistochemistry hubble_deep_field retina coins
# moon clock grass gravel brick; sklearn: china flower) plus 3 random square crops of each
# (40-80% of the shorter side), cosine similarity of tiny embeddings:
#   pairs from different photos (n=1920): p10 -0.31  p25 -0.06  p50 0.30  p75 0.64  p90 0.83
#   the 16 whole photos only   (n=120):  p10 -0.26  p25 -0.07  p50 0.34  p75 0.68  p90 0.81
#   crops of the same photo    (n=96):   p10  0.75  p25  0.89  p50 0.95  p75 0.98  p90 1.00
# Seeds 1-3 move p25/p75 by < 0.05. The band [-0.05, 0.65] ~ p25/p75 keeps 50% of the
# different-photo pairs (26% fall below, 24% above) and rejects 93% of same-photo crop pairs
# as too similar.
TINY_LOW = -0.05
TINY_HIGH = 0.65

PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        _dinov2("small", 384, "ViT-S/14"),
        _dinov2("base", 768, "ViT-B/14"),
        _dinov2("large", 1024, "ViT-L/14"),
        _clip("clip-vitb32", "ViT-B-32", "vit_base_patch32_clip_224", 512, "ViT-B/32", 32),
        _clip("clip-vitb16", "ViT-B-16", "vit_base_patch16_clip_224", 512, "ViT-B/16", 16),
        _clip("clip-vitl14", "ViT-L-14", "vit_large_patch14_clip_224", 768, "ViT-L/14", 14),
        EncoderPreset(
            name="siglip-vitb16",
            family="open_clip",
            arch="ViT-B-16-SigLIP",
            pretrained_tag="webli",
            image_size=224,
            resize_size=224,
            interpolation="bicubic",
            mean=SIGLIP_MEAN,
            std=SIGLIP_STD,
            # Not calibrated yet: the CLIP band from the paper until measured on SigLIP.
            low=0.65,
            high=0.9,
            embed_dim=768,
            description="SigLIP ViT-B/16 (open_clip ViT-B-16-SigLIP, pretrained='webli'), "
            "image embedding",
            # open_clip's pretrained cfg for this tag says resize_mode 'squash'.
            resize_mode="squash",
            hub_repo="timm/ViT-B-16-SigLIP",
            hub_files=OPEN_CLIP_HUB_FILES,
        ),
        EncoderPreset(
            name="tiny",
            family="tiny",
            arch="tiny-vit-p8-64",
            pretrained_tag="",
            image_size=64,
            resize_size=72,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            low=TINY_LOW,
            high=TINY_HIGH,
            embed_dim=128,
            description="tiny random ViT (64 px) for tests and demos; not semantic",
            patch_size=8,
        ),
    )
}

DEFAULT_ENCODER = "dinov2-vitb14"


def get_preset(name: str) -> EncoderPreset:
    """Return the preset called `name`, or raise ConfigError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        valid = ", ".join(PRESETS)
        raise ConfigError(f"unknown encoder {name!r}; valid encoders: {valid}") from None
