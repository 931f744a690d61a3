"""A character's own LoRA file (modular customization, docs/design.md#modular-customization): read it, check it
against the pair's base model, and put it on a pipeline as a PEFT adapter.

Two checks, at two moments:

* ``check_lora_file`` (at spec load, no model): the file is a readable safetensors file whose keys are LoRA
  weights in diffusers/PEFT naming (``unet.….lora_A.weight``, ``unet.….lora.down.weight``,
  ``transformer.….lora_A.weight``) or kohya naming (``lora_unet_….lora_down.weight`` + ``.alpha``); it reads the
  format, rank and alpha from the header and shapes only.
* ``load_character_lora`` (where the base model is loaded): every module the file names exists in the family's
  denoiser with the shapes the file's weights need, else ONE error naming the file and the first mismatching key
  (expected vs got). Kohya names are mapped to diffusers module paths by the family
  (``ModelFamily.kohya_lora_modules``), so this module never branches on the family.

Only the denoiser's LoRA is used: text-encoder weights in the file are counted and reported as ignored (the
merge and the fine-tune train the denoiser, as castlora's own LoRAs do by default).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from pipeline.lora.adapters import LoraError, activate_adapter
from pipeline.storage.hashing import sha256_file

PEFT_FORMAT, KOHYA_FORMAT = "diffusers", "kohya"
# A LoRA half in diffusers/PEFT naming: <module>.<half>.weight
_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<half>lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"\.weight$"
)
_PEFT_DOWN = ("lora.down", "lora_A", "lora_linear_layer.down")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_[a-z0-9]+_.+?)\.(?P<half>lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^(?P<module>lora_[a-z0-9]+_.+?)\.alpha$")
_KOHYA_DENOISER = "lora_unet_"


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA: ``delta = alpha / rank · up @ down`` (conv kernels flattened)."""

    down: torch.Tensor
    """(rank, in_features[, kh, kw])."""
    up: torch.Tensor
    """(out_features, rank[, 1, 1])."""
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight update (out, in·kh·kw) in float32, times ``scale``."""
        down = self.down.float().reshape(self.rank, -1)
        up = self.up.float().reshape(self.up.shape[0], self.rank)
        return (scale * self.scale) * (up @ down)


@dataclass(frozen=True)
class LoraFileInfo:
    """What the file says about itself, read from its header and tensor shapes only."""

    path: str
    file_format: str
    modules: int
    rank: int
    """The largest rank of its modules (files with per-module ranks exist)."""
    alpha: float | None
    """The alpha the file records (kohya ``.alpha`` / diffusers adapter metadata); None: loaders assume rank."""
    text_encoder_modules: int


@dataclass(frozen=True)
class CharacterLora:
    """A character's LoRA as the denoiser's modules need it, with where it came from."""

    path: str
    sha256: str
    file_format: str
    modules: dict[str, LoraModule]
    """Denoiser module path (diffusers naming, e.g. ``down_blocks.1.attentions.0.….to_q``) -> its LoRA."""
    scale: float = 1.0
    ignored: tuple[str, ...] = field(default=())
    """File keys not used (text-encoder weights)."""

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return max(m.alpha for m in self.modules.values())

    def deltas(self) -> dict[str, torch.Tensor]:
        """Every module's weight update at the character's ``scale``."""
        return {name: module.delta(self.scale) for name, module in self.modules.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.file_format,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "modules": len(self.modules),
            "ignored_keys": len(self.ignored),
        }


def _open(path: Path) -> tuple[list[str], dict[str, str], Any]:
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}).") from exc
    return list(handle.keys()), dict(handle.metadata() or {}), handle


def check_lora_file(path: str | Path) -> LoraFileInfo:
    """File-level checks (no model): readable safetensors with LoRA weights; its format, rank and alpha."""
    path = Path(path)
    keys, header, handle = _open(path)
    kohya = [k for k in keys if _KOHYA_KEY.match(k)]
    peft = [k for k in keys if _PEFT_KEY.match(k)]
    if not kohya and not peft:
        shown = ", ".join(keys[:3]) or "no tensors"
        raise LoraError(
            f"{path}: holds no LoRA weights (expected keys like 'unet.….lora_A.weight' or "
            f"'lora_unet_….lora_down.weight'; found {shown})."
        )
    file_format = KOHYA_FORMAT if len(kohya) >= len(peft) else PEFT_FORMAT
    lora_keys = kohya if file_format == KOHYA_FORMAT else peft
    pattern = _KOHYA_KEY if file_format == KOHYA_FORMAT else _PEFT_KEY
    downs = [k for k in lora_keys if pattern.match(k)["half"] in (*_PEFT_DOWN, "lora_down")]
    ranks = [int(handle.get_slice(k).get_shape()[0]) for k in downs]
    text = [k for k in downs if _is_text_encoder(k)]
    alpha = _header_alpha(keys, header, handle, file_format)
    return LoraFileInfo(str(path), file_format, len(downs), max(ranks, default=0), alpha, len(text))


def _is_text_encoder(key: str) -> bool:
    return key.startswith(("text_encoder", "lora_te", "te_", "text_model."))


def _header_alpha(keys: Sequence[str], header: Mapping[str, str], handle: Any, file_format: str) -> float | None:
    if file_format == KOHYA_FORMAT:
        alphas = [k for k in keys if _KOHYA_ALPHA.match(k)]
        return float(handle.get_tensor(alphas[0]).item()) if alphas else None
    adapter = _adapter_metadata(header)
    for key, value in adapter.items():
        if key.endswith("lora_alpha") and not key.startswith("text_encoder"):
            return float(value)
    return None


def _adapter_metadata(header: Mapping[str, str]) -> dict[str, Any]:
    try:
        parsed = json.loads(header.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def read_lora_modules(
    path: str | Path, denoiser_prefix: str, kohya_modules: Mapping[str, tuple[tuple[str, slice], ...]] | None
) -> tuple[str, dict[str, LoraModule], tuple[str, ...]]:
    """(format, denoiser module path -> LoraModule, ignored keys) of a LoRA file.

    ``denoiser_prefix``: the component prefix of diffusers files (``unet``, ``transformer``); keys without any
    component prefix are read as the denoiser's. ``kohya_modules``: kohya module name -> the denoiser modules it
    holds with their rows of ``lora_up`` (``ModelFamily.kohya_lora_modules``); None when the family cannot read
    kohya files. A fused kohya module gives each member the shared ``down``, its rows of ``up`` and the module's
    alpha: the member's delta exactly."""
    path = Path(path)
    info = check_lora_file(path)
    tensors = load_file(str(path))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    ignored: list[str] = []
    fused: set[str] = set()
    if info.file_format == KOHYA_FORMAT:
        if kohya_modules is None:
            raise LoraError(f"{path}: kohya LoRA files cannot be read for this base model; give the diffusers file.")
        untrained: set[str] = set()
        for key, tensor in tensors.items():
            alpha_match = _KOHYA_ALPHA.match(key)
            match = _KOHYA_KEY.match(key)
            name = (alpha_match or match)["module"] if (alpha_match or match) else None
            if name is None or not name.startswith(_KOHYA_DENOISER):
                ignored.append(key)
                continue
            if name not in kohya_modules:
                raise LoraError(
                    f"{path}: key {key!r} names no module of the base model's denoiser (it has no kohya module "
                    f"{name!r}); the LoRA was made for another model."
                )
            members = kohya_modules[name]
            for module, rows in members:
                if alpha_match:
                    alphas[module] = float(tensor.item())
                elif match["half"] == "lora_down":
                    halves.setdefault(module, {})["down"] = tensor
                elif len(members) > 1 and not tensor[rows].any():
                    untrained.add(module)  # a fused member the LoRA left untrained (zero rows): no delta
                    ignored.append(f"{key}[{module}]")
                else:
                    halves.setdefault(module, {})["up"] = tensor[rows]
                    if len(members) > 1:
                        fused.add(module)
        halves = {module: sides for module, sides in halves.items() if module not in untrained}
    else:
        header_alpha = info.alpha
        for key, tensor in tensors.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                if key.endswith(".alpha"):  # some tools write per-module alphas beside PEFT names
                    alphas[key.removesuffix(".alpha").removeprefix(f"{denoiser_prefix}.")] = float(tensor.item())
                else:
                    ignored.append(key)
                continue
            module = match["module"]
            if _is_text_encoder(module):
                ignored.append(key)
                continue
            module = module.removeprefix(f"{denoiser_prefix}.")
            halves.setdefault(module, {})["down" if match["half"] in _PEFT_DOWN else "up"] = tensor
        for module in halves:
            alphas.setdefault(module, header_alpha if header_alpha is not None else math.nan)
    modules: dict[str, LoraModule] = {}
    for module, sides in sorted(halves.items()):
        if set(sides) != {"down", "up"}:
            raise LoraError(f"{path}: module {module!r} has only its {', '.join(sides)} weight; the file is incomplete")
        rank = int(sides["down"].shape[0])
        alpha = alphas.get(module, math.nan)
        alpha = float(rank) if math.isnan(alpha) else alpha
        down, up = sides["down"], sides["up"]
        if module in fused:
            # A block-diagonal fused up (castlora's own kohya export) leaves each member most of the rank unused:
            # keep only the columns it uses, with alpha rescaled so alpha / rank (the delta) is unchanged.
            used = up.reshape(up.shape[0], rank).abs().sum(0) > 0
            kept = int(used.sum())
            if 0 < kept < rank:
                down, up, alpha = down[used], up[:, used], alpha * kept / rank
        modules[module] = LoraModule(down, up, alpha)
    if not modules:
        raise LoraError(f"{path}: has no LoRA weights for the base model's denoiser ({denoiser_prefix}).")
    return info.file_format, modules, tuple(ignored)


def check_against_model(path: str | Path, modules: Mapping[str, LoraModule], denoiser: torch.nn.Module) -> None:
    """Every module exists in ``denoiser`` with the shapes its LoRA needs; else one error naming ``path`` and the
    first mismatching key with the expected and the file's shape."""
    for name, lora in sorted(modules.items()):
        try:
            layer = denoiser.get_submodule(name)
        except AttributeError:
            raise LoraError(
                f"{path}: LoRA key {name}.lora_A names no module of the base model's denoiser; the LoRA was made for "
                "another model."
            ) from None
        layer = getattr(layer, "base_layer", layer)  # already wrapped by a PEFT adapter
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() not in (2, 4):
            raise LoraError(f"{path}: LoRA key {name}.lora_A targets a {type(layer).__name__}, not a linear/conv layer")
        out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
        kernel = tuple(weight.shape[2:])
        expected_down = (lora.rank, in_features, *kernel)
        expected_up = (out_features, lora.rank, *((1, 1) if kernel else ()))
        for half, tensor, expected in (("lora_A", lora.down, expected_down), ("lora_B", lora.up, expected_up)):
            if tuple(tensor.shape) != expected:
                raise LoraError(
                    f"{path}: LoRA key {name}.{half}.weight has shape {tuple(tensor.shape)} but the base model's "
                    f"{name} needs {expected}; the LoRA was made for another model (or another model size)."
                )


def load_character_lora(pipe: Any, path: str | Path, scale: float = 1.0) -> CharacterLora:
    """Read ``path`` for ``pipe``'s family and check it against the denoiser's module shapes (see module doc)."""
    from pipeline.families import family_for  # families import this package: import at call time

    family = family_for(pipe)
    denoiser = family.component(pipe, family.denoiser)
    path = Path(path)
    kohya_modules = family.kohya_lora_modules(pipe)
    file_format, modules, ignored = read_lora_modules(path, family.denoiser, kohya_modules)
    check_against_model(path, modules, denoiser)
    return CharacterLora(str(path), sha256_file(path), file_format, modules, float(scale), ignored)


def attach_lora_modules(
    denoiser: torch.nn.Module, modules: Mapping[str, LoraModule], adapter_name: str, scale: float = 1.0
) -> None:
    """Put ``modules`` on ``denoiser`` as the PEFT adapter ``adapter_name`` (exact module paths, each module's own
    rank and ``alpha / rank · scale``; lower ranks zero-padded, which leaves the delta unchanged) and make it the
    active one. The base weights are untouched, so adapters can be switched and removed."""
    rank = max(m.rank for m in modules.values())
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(modules), init_lora_weights=False)
    denoiser.requires_grad_(False)
    inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    denoiser._hf_peft_config_loaded = True
    write_lora_modules(denoiser, modules, adapter_name)
    for name, lora in modules.items():
        denoiser.get_submodule(name).scaling[adapter_name] = lora.scale * scale
    activate_adapter(denoiser, adapter_name)


def write_lora_modules(denoiser: torch.nn.Module, modules: Mapping[str, LoraModule], adapter_name: str) -> None:
    """Copy each module's down/up weights into the existing PEFT adapter ``adapter_name`` of its layer; an adapter
    of a higher rank keeps zeros in the rows/columns beyond the module's rank (the same delta)."""
    with torch.no_grad():
        for name, lora in modules.items():
            layer = denoiser.get_submodule(name)
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a.zero_()
            b.zero_()
            a[: lora.rank].copy_(lora.down.reshape(lora.rank, *a.shape[1:]).to(a.dtype))
            b[:, : lora.rank].copy_(lora.up.reshape(b.shape[0], lora.rank, *b.shape[2:]).to(b.dtype))


def activate_adapters(denoiser: torch.nn.Module, adapter_names: Sequence[str]) -> None:
    """Make every adapter in ``adapter_names`` active at once: their deltas add (the naive merge)."""
    for layer in denoiser.modules():
        if isinstance(layer, BaseTunerLayer):
            present = [name for name in adapter_names if name in layer.lora_A]
            if present:
                layer.set_adapter(present)
