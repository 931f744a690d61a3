"""FLUX.1 transformer LoRA in kohya/ComfyUI naming (docs/design.md#flux1-lora-files-kohya).

castlora trains FLUX.1 with PEFT on diffusers' ``FluxTransformer2DModel``, whose attention has separate q, k and v
projections (``transformer_blocks.N.attn.to_q``, ``...add_q_proj``) and whose single-stream blocks have separate
``attn.to_q/k/v`` and ``proj_mlp``. The original BFL model, which kohya, ComfyUI and Forge name their files after,
fuses them: ``double_blocks.N.img_attn.qkv``, ``txt_attn.qkv`` and ``single_blocks.N.linear1`` (rows q, k, v, mlp).
A fused kohya module holds the per-projection LoRAs exactly:

    down = [A_q; A_k; A_v]                        (n·r, in)
    up   = block-diagonal(B_q, B_k, B_v)          (out_q + out_k + out_v, n·r)

so ``up @ down`` stacks ``B_q A_q``, ``B_k A_k``, ``B_v A_v`` row-wise, and ``.alpha`` is ``n·alpha`` so the scale a
loader applies, alpha / rank with rank = ``down.shape[0]``, stays ``alpha / r``. A projection the LoRA did not
target gets a zero block, so the layout is always the full block-diagonal that diffusers' kohya conversion splits
back into the per-projection A and B unchanged (its "sparse" branch). kohya's own ``split_qkv`` writes the same
layout but keeps alpha unchanged; castlora scales it so every loader applies the trained scale.

Only modules inside the double- and single-stream blocks are converted: diffusers' kohya loader drops the
top-level ones (``x_embedder``, ``context_embedder``, ``time_text_embed``, ``norm_out``, ``proj_out``) when it loads
a file into the transformer, so their LoRAs would not load back; they are refused like any unknown key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.lora.adapters import LoraError
from pipeline.storage.atomic import atomic_path
from pipeline.storage.tensor_files import canonicalize_safetensors

KOHYA_FLUX_WEIGHT_NAME = "lora_kohya_flux.safetensors"
MLP_RATIO = 4
"""FLUX.1's single-stream MLP width over the model width (``proj_mlp``'s rows in ``linear1``)."""

_KEY = re.compile(
    r"^(?:transformer\.)?(?P<stream>transformer_blocks|single_transformer_blocks)\.(?P<block>\d+)\."
    r"(?P<module>.+)\.(?P<half>lora_A|lora_B|lora\.down|lora\.up)\.weight$"
)
_DOWN_HALVES = ("lora_A", "lora.down")


@dataclass(frozen=True)
class _Target:
    """One kohya module: the diffusers modules it holds (in its row order) and each one's rows over the width."""

    kohya: str
    members: tuple[str, ...]
    row_ratios: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return len(self.members) > 1


def _plain(kohya: str, module: str) -> _Target:
    return _Target(kohya, (module,), (0,))  # 0: rows not checked (an unfused module keeps whatever shape it has)


_DOUBLE_TARGETS: tuple[_Target, ...] = (
    _Target("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    _plain("img_attn_proj", "attn.to_out.0"),
    _Target("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
    _plain("txt_attn_proj", "attn.to_add_out"),
    _plain("img_mlp_0", "ff.net.0.proj"),
    _plain("img_mlp_2", "ff.net.2"),
    _plain("txt_mlp_0", "ff_context.net.0.proj"),
    _plain("txt_mlp_2", "ff_context.net.2"),
    _plain("img_mod_lin", "norm1.linear"),
    _plain("txt_mod_lin", "norm1_context.linear"),
)
_SINGLE_TARGETS: tuple[_Target, ...] = (
    _Target("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, MLP_RATIO)),
    _plain("linear2", "proj_out"),
    _plain("modulation_lin", "norm.linear"),
)
_STREAMS = {
    "transformer_blocks": ("double_blocks", _DOUBLE_TARGETS),
    "single_transformer_blocks": ("single_blocks", _SINGLE_TARGETS),
}


def _target_of(stream: str, module: str) -> tuple[_Target, int] | None:
    for target in _STREAMS[stream][1]:
        if module in target.members:
            return target, target.members.index(module)
    return None


def _unknown(key: str) -> LoraError:
    return LoraError(
        f"FLUX LoRA key {key!r} has no kohya FLUX name; only the lora_A/lora_B (or lora.down/lora.up) weights of "
        "the double- and single-stream blocks' attention, feed-forward and modulation layers are exported "
        "(top-level layers such as x_embedder or proj_out, DoRA and LoRA biases are not)."
    )


@dataclass
class _Module:
    stream: str
    block: int
    target: _Target
    halves: dict[str, dict[int, torch.Tensor]]  # "down"/"up" -> member index -> tensor


def _group(state: Mapping[str, torch.Tensor]) -> list[_Module]:
    """Parse every key into (block, kohya module, member, half); refuse the first key that does not fit."""
    modules: dict[tuple[str, int, str], _Module] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        found = _target_of(match["stream"], match["module"]) if match else None
        if match is None or found is None:
            raise _unknown(key)
        if tensor.dim() != 2:
            raise LoraError(f"FLUX LoRA weight {key!r} has shape {tuple(tensor.shape)}; a linear LoRA is 2-d.")
        target, member = found
        block = int(match["block"])
        entry = modules.setdefault(
            (match["stream"], block, target.kohya), _Module(match["stream"], block, target, {"down": {}, "up": {}})
        )
        entry.halves["down" if match["half"] in _DOWN_HALVES else "up"][member] = tensor
    order = {(stream, t.kohya): i for stream, (_, targets) in _STREAMS.items() for i, t in enumerate(targets)}
    streams = list(_STREAMS)
    return sorted(modules.values(), key=lambda m: (streams.index(m.stream), m.block, order[(m.stream, m.target.kohya)]))


def _module_path(module: _Module, member: int) -> str:
    return f"{module.stream}.{module.block}.{module.target.members[member]}"


def _pairs(module: _Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    downs, ups = module.halves["down"], module.halves["up"]
    for member in sorted(set(downs) ^ set(ups)):
        have = "down (lora_A)" if member in downs else "up (lora_B)"
        raise LoraError(f"FLUX LoRA module {_module_path(module, member)!r} has only its {have} weight.")
    pairs = {}
    for member in sorted(downs):
        down, up = downs[member], ups[member]
        if up.shape[1] != down.shape[0]:
            raise LoraError(
                f"FLUX LoRA module {_module_path(module, member)!r}: lora_B has rank {up.shape[1]} but lora_A "
                f"has rank {down.shape[0]}."
            )
        pairs[member] = (down.detach(), up.detach())
    return pairs


def _fuse(module: _Module, pairs: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Concatenated downs and block-diagonal ups over all members; absent members get zero blocks."""
    first_down, first_up = next(iter(pairs.values()))
    rank, width = first_down.shape
    for member, (down, up) in pairs.items():
        if down.shape != (rank, width):
            raise LoraError(
                f"FLUX LoRA module {_module_path(module, member)!r} has lora_A {tuple(down.shape)}, but the other "
                f"projections fused into {module.target.kohya} have {(rank, width)}; they need one rank and width."
            )
        if up.shape[0] != module.target.row_ratios[member] * width:
            raise LoraError(
                f"FLUX LoRA module {_module_path(module, member)!r} has {up.shape[0]} output rows; FLUX.1 has "
                f"{module.target.row_ratios[member] * width} there (width {width}). Not a FLUX.1 transformer?"
            )
    dtype = torch.promote_types(first_down.dtype, first_up.dtype)
    n = len(module.target.members)
    rows = [ratio * width for ratio in module.target.row_ratios]
    down = torch.zeros(n * rank, width, dtype=dtype, device=first_down.device)
    up = torch.zeros(sum(rows), n * rank, dtype=dtype, device=first_down.device)
    start = 0
    for member in range(n):
        if member in pairs:
            member_down, member_up = pairs[member]
            down[member * rank : (member + 1) * rank] = member_down
            up[start : start + rows[member], member * rank : (member + 1) * rank] = member_up
        start += rows[member]
    return down, up


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoraError(f"LoRA alpha must be a finite number > 0, got {alpha!r}.")
    return alpha


def to_kohya_flux(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Convert a PEFT/diffusers FLUX.1 transformer LoRA state (keys ``[transformer.]<module>.lora_A.weight`` /
    ``.lora_B.weight``, or diffusers' ``.lora.down/.lora.up``; trained with scale ``alpha / r``) to kohya/ComfyUI keys
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.lora_up.weight``, 0-d ``.alpha``), fusing
    q/k/v (and ``proj_mlp`` into ``linear1``) as the module docstring describes."""
    alpha = _check_alpha(alpha)
    modules = _group(state)
    if not modules:
        raise LoraError("The FLUX LoRA state is empty; nothing to export (was the LoRA added to the transformer?).")
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        pairs = _pairs(module)
        if module.target.fused:
            down, up = _fuse(module, pairs)
            module_alpha = alpha * len(module.target.members)
        else:
            down, up = pairs[0]
            module_alpha = alpha
        name = f"lora_unet_{_STREAMS[module.stream][0]}_{module.block}_{module.target.kohya}"
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(module_alpha, dtype=torch.float32)  # 0-d, as kohya writes it
    return out


def kohya_flux_module_map(
    double_blocks: int, single_blocks: int, width: int
) -> dict[str, tuple[tuple[str, slice], ...]]:
    """Kohya FLUX module name -> the transformer modules it holds, each with its rows of the kohya ``lora_up``
    (q/k/v fused: ``width`` rows each; ``proj_mlp`` ``MLP_RATIO · width``; an unfused module: all rows). What reading
    a user's kohya FLUX file needs (docs/design.md#modular-customization): each member's delta is
    ``alpha / rank · up[rows] @ down``, whether the file's fused up is block-diagonal (as castlora writes it) or
    dense (one LoRA on the fused layer, as kohya trains it)."""
    found: dict[str, tuple[tuple[str, slice], ...]] = {}
    for stream, count in (("transformer_blocks", double_blocks), ("single_transformer_blocks", single_blocks)):
        kohya_stream, targets = _STREAMS[stream]
        for block in range(count):
            for target in targets:
                members: list[tuple[str, slice]] = []
                start = 0
                for member, ratio in zip(target.members, target.row_ratios, strict=True):
                    rows = slice(start, start + ratio * width) if target.fused else slice(None)
                    start += ratio * width
                    members.append((f"{stream}.{block}.{member}", rows))
                found[f"lora_unet_{kohya_stream}_{block}_{target.kohya}"] = tuple(members)
    return found


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _trained_rank(state: Mapping[str, torch.Tensor]) -> int:
    downs = [tensor for key, tensor in state.items() if (match := _KEY.match(key)) and match["half"] in _DOWN_HALVES]
    return max(int(tensor.shape[0]) for tensor in downs)


def _string_metadata(metadata: Mapping[str, str], where: str) -> dict[str, str]:
    bad = sorted(str(key) for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str))
    if bad:
        raise LoraError(f"Header metadata for {where} must map str to str; convert the values of {bad} to strings.")
    return dict(metadata)


def save_kohya_flux_lora(
    path: Path, state: Mapping[str, torch.Tensor], alpha: float, metadata: Mapping[str, str] | None = None
) -> Path:
    """Convert ``state`` (PEFT/diffusers naming, see ``to_kohya_flux``) and write it atomically as a kohya FLUX.1
    LoRA safetensors file; the header carries kohya's ``ss_network_module``/``ss_network_dim`` (the trained rank
    r)/``ss_network_alpha``/``ss_base_model_version`` unless ``metadata`` sets them."""
    path = Path(path)
    extra = _string_metadata(metadata or {}, path.name)
    kohya = to_kohya_flux(state, alpha)
    header = {
        "format": "pt",
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
        "ss_network_dim": str(_trained_rank(state)),
        "ss_network_alpha": _number(_check_alpha(alpha)),
        **extra,
    }
    with atomic_path(path) as temporary:
        save_file(kohya, str(temporary), metadata=header)
        canonicalize_safetensors(temporary)
    return path
