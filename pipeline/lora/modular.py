"""Modular customization (MuDI §5.4, docs/design.md#modular-customization): from each character's own LoRA,
render reference images, merge the LoRAs, and fine-tune the merge with Seg-Mix and a KL term towards it.

Everything here goes through ``ModelFamily`` (prompts, noising, prediction, adapters, export), so it works for
every family; the LoRA files are read by ``pipeline.lora.character_lora`` and merged by ``pipeline.lora.merge``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.families.base import ImageGeometry
from pipeline.lora.adapters import LoraSpec, remove_adapter
from pipeline.lora.character_lora import CharacterLora, load_character_lora, write_lora_modules
from pipeline.lora.merge import MERGE_METHODS, MergedLora, capture_grams, concat_merge, merge
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import LoraOutput, TrainingRun, train_version
from pipeline.models.loading import release_memory
from pipeline.storage.atomic import write_json_atomic
from pipeline.storage.hashing import sha256_file, sha256_json
from pipeline.train import TrainConfig, TrainingSample, train_lora

MERGE_ADAPTER = "castlora"
MODULAR_FILE = "modular.json"
"""In the lora stage folder: the records of the naive merge and the merge the fine-tune started from."""
CHARACTER_PROMPTS: tuple[str, ...] = (
    "a photo of {phrase}",
    "a photo of {phrase}, full body, plain background",
    "a close-up photo of {phrase}",
    "a photo of {phrase} outdoors",
    "a photo of {phrase} in a room",
)
"""Prompts the character images and the fusion features are rendered from ({phrase}: the token phrase)."""


@dataclass(frozen=True)
class ModularConfig:
    """How a pair made of character LoRAs becomes the pair's LoRA: merge, then a short Seg-Mix fine-tune."""

    merge_method: str = "gradient_fusion"
    """Only for a pair whose characters are all given as LoRA files (else unused): sum (deltas added, stored at
    the characters' rank by SVD), concat (ranks stacked: the exact sum) or gradient_fusion (Mix-of-Show: per layer
    least squares on each character's own features; MuDI's choice)."""
    merge_rank: int | None = None
    """Rank the merge is stored at; not set: sum keeps the characters' rank, gradient_fusion their total."""
    fusion_ridge: float = 1e-4
    """Ridge of gradient fusion's least squares, relative to the features' mean energy."""
    fusion_timesteps: int = 3
    """Timesteps per prompt at which each character's layer inputs are captured for gradient fusion."""
    finetune_steps: int = 250
    """Seg-Mix fine-tuning steps of the merge (MuDI: 200-300). For a pair given as character LoRA files this
    replaces ``steps``; ``rank``/``alpha`` are the merge's and ``kl_weight`` is ``finetune_kl_weight``."""
    finetune_kl_weight: float = 1.0
    """Weight of the KL term towards the merged model during the fine-tune (keeps it from saturating)."""

    def __post_init__(self) -> None:
        problems = []
        if self.merge_method not in MERGE_METHODS:
            problems.append(f"merge_method={self.merge_method!r} must be one of {list(MERGE_METHODS)}")
        if self.merge_rank is not None and self.merge_rank < 1:
            problems.append(f"merge_rank={self.merge_rank} must be >= 1 (or unset)")
        if self.fusion_ridge <= 0 or self.fusion_timesteps < 1:
            problems.append("fusion_ridge must be > 0 and fusion_timesteps >= 1")
        if self.finetune_steps < 1 or self.finetune_kl_weight < 0:
            problems.append("finetune_steps must be >= 1 and finetune_kl_weight >= 0")
        if problems:
            raise CastloraError("Modular settings: " + "; ".join(problems) + ".")


def character_prompts(token_phrase: str, count: int) -> list[str]:
    """``count`` prompts for one character, cycling ``CHARACTER_PROMPTS``."""
    return [CHARACTER_PROMPTS[i % len(CHARACTER_PROMPTS)].format(phrase=token_phrase) for i in range(count)]


def denoiser_runner(
    pipe: Any, prompts: Sequence[str], resolution: int, timesteps: int, seed: int = 0
) -> Callable[[], None]:
    """A call that runs ``prompts`` through the family's denoiser at ``timesteps`` training timesteps each, from
    seeded noise (what the fusion's feature hooks listen to)."""
    family = family_for(pipe)
    denoiser = family.component(pipe, family.denoiser)
    device = next(denoiser.parameters()).device

    def run() -> None:
        generator = torch.Generator().manual_seed(seed)
        embeds, pooled = family.encode_prompts(pipe, list(prompts), device)
        side = resolution // family.downsampling_factor(pipe)
        objective = family.objective(pipe)
        geometry = [ImageGeometry((resolution, resolution), (0, 0))] * len(prompts)
        conditioning = {k: v.to(device) for k, v in family.conditioning(geometry, resolution).items()}
        dtype = next(denoiser.parameters()).dtype
        for _ in range(timesteps):
            shape = (len(prompts), family.latent_channels(pipe), side, side)
            clean = torch.randn(shape, generator=generator)
            noise = torch.randn(shape, generator=generator)
            steps = objective.draw_timesteps(len(prompts), generator)
            noisy, _ = objective.noisy_and_target(clean, noise, steps)
            family.predict(
                denoiser, noisy.to(device, dtype), steps.to(device), embeds.to(dtype), pooled.to(dtype), conditioning
            )

    return run


def load_character_loras(pipe: Any, characters: Sequence[Any]) -> list[CharacterLora]:
    """Each character's LoRA (``CharacterSpec.lora``) read and checked against ``pipe``'s denoiser."""
    return [load_character_lora(pipe, c.lora, c.lora_scale) for c in characters]


def merge_character_loras(
    pipe: Any, characters: Sequence[Any], config: ModularConfig, resolution: int
) -> tuple[MergedLora, list[CharacterLora]]:
    """Load, check and merge the characters' LoRAs by ``config.merge_method`` (features captured on ``pipe``)."""
    loras = load_character_loras(pipe, characters)
    grams = None
    if config.merge_method == "gradient_fusion":
        family = family_for(pipe)
        denoiser = family.component(pipe, family.denoiser)
        grams = []
        for character, lora in zip(characters, loras, strict=True):
            prompts = character_prompts(character.token_phrase, len(CHARACTER_PROMPTS))
            run = denoiser_runner(pipe, prompts, resolution, config.fusion_timesteps)
            grams.append(capture_grams(denoiser, lora, run))
    merged = merge(config.merge_method, loras, grams, config.merge_rank, config.fusion_ridge)
    return merged, loras


def short_targets(module_paths: Sequence[str], denoiser: torch.nn.Module) -> tuple[str, ...]:
    """Target names (as ``TrainConfig.targets`` writes them: ``to_q``, ``to_out.0``) that select exactly
    ``module_paths`` among the denoiser's modules: the shortest dotted suffix of each path that no other module
    shares (PEFT matches a target against every module name, not only layers); the full path when none is."""
    wanted = set(module_paths)
    layers = {
        name.removesuffix(".base_layer")
        for name, _ in denoiser.named_modules()
        if name and ".lora_" not in name and not name.endswith(("lora_dropout", "lora_magnitude_vector"))
    }
    targets: list[str] = []
    for path in sorted(wanted):
        parts = path.split(".")
        chosen = path
        for length in range(1, len(parts)):
            suffix = ".".join(parts[-length:])
            matched = {n for n in layers if n == suffix or n.endswith(f".{suffix}")}
            if matched <= wanted:
                chosen = suffix
                break
        targets.append(chosen)
    return tuple(dict.fromkeys(targets))


def put_on_pipe(pipe: Any, merged: MergedLora, adapter_name: str = MERGE_ADAPTER) -> LoraSpec:
    """Attach ``merged`` as the family's (trainable) denoiser adapter ``adapter_name``; returns its ``LoraSpec``
    (rank = alpha: the scales are folded into the weights). Layers the targets select beyond the merge's modules
    start at zero delta."""
    family = family_for(pipe)
    denoiser = family.component(pipe, family.denoiser)
    rank = merged.rank
    spec = LoraSpec(rank=rank, alpha=float(rank), target_modules=short_targets(list(merged.modules), denoiser))
    family.add_lora(family.denoiser, denoiser, spec, adapter_name)
    write_lora_modules(denoiser, merged.modules, adapter_name)
    return spec


def merged_state(pipe: Any, merged: MergedLora) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """``merged`` in the family's LoRA state naming (what ``init_lora`` takes), via an adapter on ``pipe`` that is
    removed again."""
    family = family_for(pipe)
    denoiser = family.component(pipe, family.denoiser)
    spec = put_on_pipe(pipe, merged, MERGE_ADAPTER)
    state = {
        k: v.detach().cpu().clone() for k, v in family.lora_state_dict(family.denoiser, denoiser, MERGE_ADAPTER).items()
    }
    remove_adapter(denoiser, MERGE_ADAPTER)
    return spec, state


def export_merged(pipe: Any, merged: MergedLora, folder: Path, run: TrainingRun, name: str) -> LoraRecord:
    """Write ``merged`` in both of the family's formats into ``folder`` (method and sources in the headers),
    record the files in lineage (parents: the character LoRA files) and return their record."""
    family = family_for(pipe)
    denoiser = family.component(pipe, family.denoiser)
    spec = put_on_pipe(pipe, merged, MERGE_ADAPTER)
    metadata = {"castlora_version": name, "base_model": run.base_model_id, **merged.metadata()}
    files = family.export_lora(folder, pipe, spec, metadata)
    remove_adapter(denoiser, MERGE_ADAPTER)
    sha256s = {kind: sha256_file(path) for kind, path in files.items()}
    parents = sorted(str(source["sha256"]) for source in merged.sources)
    params = {"merge_method": merged.method, "rank": merged.rank, "sources": list(merged.sources), **merged.details}
    for kind, path in files.items():
        run.recorder.record(path, sha256s[kind], parents, {**params, "format": kind}, [run.base_model_id])
    return LoraRecord(version=name, files=dict(files), sha256=sha256s, steps=0)


@dataclass
class ModularOutput:
    merged: LoraRecord
    naive: LoraRecord
    finetuned: LoraOutput
    merge: MergedLora


def run_modular_lora(
    *,
    pipe_factory: Callable[[], Any],
    characters: Sequence[Any],
    samples: Sequence[TrainingSample],
    train_config: TrainConfig,
    config: ModularConfig,
    run: TrainingRun,
    trainer: Callable[..., Any] = train_lora,
) -> ModularOutput:
    """Merge the characters' LoRAs, export the merge and the naive merge (both LoRAs at once, exactly: the concat
    merge), then fine-tune the merge on ``samples`` (the Seg-Mix bank of the generated character images) for
    ``config.finetune_steps`` with KL towards it; the fine-tune is the pair's LoRA version (``current.json``).

    The fine-tune keeps ``train_config``'s optimiser, Seg-Mix and loss settings; its LoRA shape is the merge's
    (rank = alpha = the merge's rank, targets selecting its modules), on the denoiser only."""
    resolution = int(train_config.resolution or 0)
    if resolution < 1:
        raise CastloraError("run_modular_lora needs train_config.resolution (resolve_train_config fills it).")
    pipe = pipe_factory()
    merged, loras = merge_character_loras(pipe, characters, config, resolution)
    identity = [config.merge_method, config.merge_rank, config.fusion_ridge, config.fusion_timesteps]
    identity += [[lora.sha256, lora.scale, c.token_phrase] for lora, c in zip(loras, characters, strict=True)]
    tag = sha256_json(identity)[:12]
    merged_record = export_merged(pipe, merged, run.lora_root / "merged" / tag, run, f"merged-{tag}")
    naive = concat_merge(loras)
    naive_tag = sha256_json([lora.sha256 for lora in loras] + [lora.scale for lora in loras])[:12]
    naive_record = export_merged(pipe, naive, run.lora_root / "naive_merge" / naive_tag, run, f"naive-{naive_tag}")
    spec, init_state = merged_state(pipe, merged)
    del pipe
    release_memory()
    finetune = dataclasses.replace(
        train_config,
        steps=config.finetune_steps,
        rank=spec.rank,
        alpha=spec.alpha,
        targets=spec.target_modules,
        kl_weight=config.finetune_kl_weight,
        train_text_encoder=False,
    )
    output = train_version(
        pipe=pipe_factory(), samples=samples, config=finetune, run=run, init_lora=init_state, trainer=trainer
    )
    write_json_atomic(
        {
            "merge_method": merged.method,
            "merged": merged_record.to_json(run.lora_root),
            "naive_merge": naive_record.to_json(run.lora_root),
            "sources": list(merged.sources),
            "details": merged.details,
        },
        run.lora_root / MODULAR_FILE,
    )
    return ModularOutput(merged_record, naive_record, output, merged)


def read_modular(lora_root: Path) -> dict[str, LoraRecord] | None:
    """``{"naive_merge": …, "merged": …}`` when the pair's LoRA was made by ``run_modular_lora``, else None."""
    path = Path(lora_root) / MODULAR_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: LoraRecord.from_json(data[key], path.parent, f"{path} [{key}]") for key in ("naive_merge", "merged")}


def merge_method(lora_root: Path) -> str:
    """The merge method ``run_modular_lora`` recorded in ``lora_root`` ("" for a pair trained from photos)."""
    path = Path(lora_root) / MODULAR_FILE
    return str(json.loads(path.read_text(encoding="utf-8"))["merge_method"]) if path.is_file() else ""
