"""Does an exported LoRA file load? Header, tensors, down/up pairs and finiteness, without building a model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeline.lora.adapters import LoraError
from pipeline.storage.hashing import sha256_file

# Key suffixes of the two halves of one LoRA module, per file format: diffusers files hold diffusers' naming (SDXL's
# U-Net) or PEFT's (FLUX.1's transformer, as FluxPipeline.save_lora_weights writes it).
_PAIR_SUFFIXES = {
    "diffusers": ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")),
    "kohya": ((".lora_down.weight", ".lora_up.weight"),),
}


@dataclass(frozen=True)
class LoraFileReport:
    path: Path
    format: str
    modules: int
    """The per-projection LoRA modules it holds: a fused kohya module (FLUX.1's ``img_attn_qkv``, ``linear1``:
    ``pipeline/lora/kohya_flux.py``) counts each projection it carries a LoRA for, so both files of one LoRA agree."""
    tensors: int
    metadata: dict[str, str]


def verify_lora_file(path: Path, file_format: str, expected_sha256: str | None = None) -> LoraFileReport:
    """Open ``path`` as a ``file_format`` ('diffusers' or 'kohya') LoRA; raise LoraError saying what is wrong."""
    path = Path(path)
    if file_format not in _PAIR_SUFFIXES:
        raise LoraError(f"Unknown LoRA file format {file_format!r}; expected one of {sorted(_PAIR_SUFFIXES)}.")
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist.")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise LoraError(f"LoRA file {path} does not match the hash recorded at export: it was changed or truncated.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"LoRA file {path} cannot be read as safetensors: {exc}") from exc
    modules = _paired_modules(tensors, file_format, path)
    bad = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor.float()).all())]
    if bad:
        raise LoraError(f"LoRA file {path} holds non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[0]}.")
    return LoraFileReport(path, file_format, modules, len(tensors), metadata)


def _paired_modules(tensors: Mapping[str, torch.Tensor], file_format: str, path: Path) -> int:
    namings = _PAIR_SUFFIXES[file_format]
    downs = {k.removesuffix(down) for down, _ in namings for k in tensors if k.endswith(down)}
    ups = {k.removesuffix(up) for _, up in namings for k in tensors if k.endswith(up)}
    if not downs:
        others = "".join(f" (nor '{down}')" for down, _ in namings[1:])
        raise LoraError(
            f"LoRA file {path} has no '{namings[0][0]}' tensors{others}: not a {file_format} LoRA, or empty."
        )
    unpaired = sorted(downs ^ ups)
    if unpaired:
        raise LoraError(f"LoRA file {path}: {len(unpaired)} module(s) lack their down/up half, e.g. {unpaired[0]}.")
    if file_format != "kohya":
        return len(downs)
    return _projections(tensors, namings[0][0])


def _projections(tensors: Mapping[str, torch.Tensor], down_suffix: str) -> int:
    """Projections a kohya file carries LoRAs for. The rank r is the fewest down rows of any module; a fused module's
    down stacks one r-row block per projection (a zero block for a projection the LoRA did not target), so it counts
    its non-zero blocks. Without fused modules (SDXL) this is the module count."""
    downs = [tensor for key, tensor in tensors.items() if key.endswith(down_suffix)]
    rank = min(down.shape[0] for down in downs)
    if rank == 0 or any(down.shape[0] % rank for down in downs):
        return len(downs)
    fused = [down for down in downs if down.shape[0] > rank]
    return len(downs) - len(fused) + sum(int(block.any()) for down in fused for block in down.split(rank))
