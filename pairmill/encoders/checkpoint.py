"""Reading weight files without executing them, and fitting them into a model.

Pickles (.pt/.pth/.bin) go only through `torch.load(weights_only=True)`, whose restricted
unpickler builds tensors and plain containers and rejects every other global, so a
checkpoint that smuggles code fails to load instead of running. We do not call open_clip's
loader (`open_clip.factory.load_state_dict`, open_clip 3.3.0): it passes weights_only=True but
retries with a bare `torch.load(path)` whenever that raises TypeError. On torch >= 2.6 the bare
call still defaults to weights_only=True, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set, in
which case the retry unpickles anything. Its tensor-only fixups are reused below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pairmill.encoders._deps import lazy
from pairmill.errors import WeightsError

if TYPE_CHECKING:
    import torch

    from pairmill.encoders.presets import EncoderPreset

_WRAPPER_KEYS = ("state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _few(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors or pickle checkpoint into a flat {name: tensor} dict on CPU."""
    torch = lazy("torch")
    if path.endswith(".safetensors"):
        safetensors_torch = lazy("safetensors.torch")
        try:
            obj: Any = safetensors_torch.load_file(path, device="cpu")
        except Exception as exc:
            raise WeightsError(f"cannot read {path} as safetensors: {_first_line(exc)}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            detail = _unsafe_detail(exc)
            raise WeightsError(
                f"refusing to load {path}: not a plain tensor checkpoint ({detail}); "
                "convert it to .safetensors on a trusted machine"
            ) from exc
    return unwrap_state_dict(obj, path)


def _unsafe_detail(exc: BaseException) -> str:
    """The line of torch's weights_only error that names the problem, e.g. "Trying to load
    unsupported GLOBAL posix.system ..."; its boilerplate (which suggests weights_only=False,
    something we never do) is skipped."""
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line and not line.startswith("Weights only load"):
            return line
    return type(exc).__name__


def unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Peel {"state_dict": ...}/{"model": ...} wrappers and "module." prefixes."""
    torch = lazy("torch")
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} holds no state dict (found {type(obj).__name__})")
    odd = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise WeightsError(f"{path}: state dict entries that are not tensors: {_few(odd)}")
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_strict(model: torch.nn.Module, state: dict, preset: EncoderPreset, path: str) -> None:
    """`load_state_dict(strict=True)`, but a mismatch is a one-line WeightsError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing keys: {_few(missing)}" if missing else "",
            f"unexpected keys: {_few(unexpected)}" if unexpected else "",
            f"shape mismatch (file vs model): {_few(shapes)}" if shapes else "",
        ]
        raise WeightsError(
            f"weights {path} do not fit {preset.name} ({preset.arch}): "
            + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state, strict=True)


def adapt_timm_vit(state: dict, model: torch.nn.Module) -> dict:
    """timm's ViT checkpoint filter: converts original facebook DINOv2 keys and resamples
    the position embedding (DINOv2 weights are 518 px, 37x37 patches; we run at 224)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)
    if not any(k.startswith("head.") for k in model.state_dict()):
        # A classifier head from a fine-tuned checkpoint does not touch the CLS features.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def adapt_open_clip(state: dict, model: torch.nn.Module) -> dict:
    """The tensor-only fixups of `open_clip.factory.load_checkpoint`, minus its file reading."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        own = getattr(model, name, None)
        if name in state and own is not None and state[name].ndim != own.ndim:
            state[name] = state[name].reshape(own.shape)
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by transformers>=4.31
    if position_ids not in model.state_dict():
        state.pop(position_ids, None)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state
