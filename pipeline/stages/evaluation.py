"""Stage: evaluate variants side by side on one fixed prompt × seed grid, and write a report people can read.

Every variant renders the same prompts with the same seeds (and, where it uses MuDI init, the same layout per
seed), so differences come from the variant alone. Per image: D&C in both modes for every available embedder,
the per-subject similarity of the box D&C assigned to each character (DINO / CLIP-I), CLIP-T, the count-gate
outcome, and ImageReward when configured. A metric whose model is unavailable is written as ``unavailable``
with the reason — never computed with another model instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.dnc.pair_scorer import ImageScorer
from pipeline.errors import CastloraError
from pipeline.evaluation.draw import annotated_grid, box_annotations
from pipeline.evaluation.report import (
    TRAINING_COLUMNS,
    availability,
    plot_rounds,
    plot_score_distributions,
    render_markdown,
    summarize,
)
from pipeline.infer import Layout
from pipeline.lora.record import LoraRecord
from pipeline.lora.versions import LoraOutput, TrainingRun, train_version
from pipeline.models.loading import release_memory
from pipeline.rendering import GenerationSettings, render_samples
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import write_manifest
from pipeline.train import TrainConfig, TrainingSample

OK, UNAVAILABLE, UNDEFINED = "ok", "unavailable", "undefined"
TRAINED_VARIANTS = ("dreambooth", "segmix", "segmix_init", "iterative")
"""The comparison the MuDI paper makes: DreamBooth (no Seg-Mix), Seg-Mix, + MuDI init, + iterative training."""
MODULAR_VARIANTS = ("naive_merge", "merged", "merged_segmix")
MERGE_ONLY_VARIANTS = ("naive_merge", "merged")
"""Modular variants that are merges of the character LoRA files, never trained: the training table says so."""
MERGE_NOT_TRAINED = "not trained: the character LoRA files merged"
"""For a pair given as character LoRA files (MuDI §5.4, docs/design.md#modular-customization): both LoRAs loaded
together, their merge, and the merge fine-tuned with Seg-Mix and KL (the pair's LoRA)."""
VARIANTS = TRAINED_VARIANTS + MODULAR_VARIANTS
BASELINE_DIR = "baseline"
"""The DreamBooth baseline's LoRA lives in ``<evaluation>/baseline/<version>/`` with its ``current.json``: a
declared output of the evaluation asset (published with its folder, reported in its metadata)."""


@dataclass(frozen=True)
class Variant:
    name: str
    lora: LoraRecord | None
    """The LoRA it renders with; None renders the base model."""
    gamma: float | None
    """MuDI init weight; None = plain noise."""
    note: str = ""


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    token_phrase: str


@dataclass(frozen=True)
class EvaluationScoring:
    """How every rendered image is judged, and why a metric is missing where its model is unavailable."""

    scorer: ImageScorer
    unavailable_embedders: dict[str, str]
    """Embedder name -> why it could not be loaded (reported as ``unavailable``)."""
    clip_text_image: Callable[[list[Image.Image], list[str]], np.ndarray] | None
    """CLIP-T per (image, text); None when CLIP is unavailable (``clip_t_note`` says why)."""
    clip_t_note: str
    image_reward_note: str


@dataclass(frozen=True)
class EvaluationReport:
    """What the report shows besides the grid's metrics."""

    title: str = "castlora evaluation"
    notes: Sequence[str] = ()
    rounds: pd.DataFrame | None = None
    """The iteration's rounds (plotted when given)."""
    distance_fraction: float | None = None
    """The ``kept_ratio`` threshold drawn on the rounds plot."""
    segmix_lora: LoraRecord | None = None
    """Each variant's training settings are compared with this LoRA's."""


@dataclass
class EvaluationOutput:
    folder: Path
    metrics: pd.DataFrame
    summary: pd.DataFrame
    report: str
    plots: dict[str, Path]
    grids: dict[str, Path]
    training: pd.DataFrame
    """What each variant's LoRA was trained with (``training_settings``)."""
    skipped: dict[str, str] = field(default_factory=dict)


def dreambooth_config(segmix: TrainConfig) -> TrainConfig:
    """The DreamBooth baseline's settings: the Seg-Mix LoRA's, exactly, with Seg-Mix off (``segmix_p`` alone
    differs, so the comparison isolates Seg-Mix). The baseline trains from scratch, so a KL term towards a starting
    LoRA (a merge's fine-tune has one) has nothing to point at and is off."""
    return dataclasses.replace(segmix, segmix_p=0.0, kl_weight=0.0)


def train_baseline(
    *,
    pipe: Any,
    segmix_lora: LoraRecord,
    samples_for: Callable[[TrainConfig], Sequence[TrainingSample]],
    out_dir: Path,
    cache_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
) -> LoraOutput:
    """Train (or resume, or reuse) the DreamBooth baseline of ``segmix_lora`` (the pair's LoRA record) into
    ``out_dir/baseline/<version>/``, exported, recorded in lineage and named by ``out_dir/baseline/current.json``.

    ``samples_for(config)`` gives the pair's training samples for that config (prior images when it uses prior
    preservation).
    """
    config = dreambooth_config(segmix_lora.train_config())
    run = TrainingRun(Path(out_dir) / BASELINE_DIR, Path(cache_dir), recorder, base_model_id)
    return train_version(pipe=pipe, samples=samples_for(config), config=config, run=run)


def modular_variants(
    names: Sequence[str], modular: dict[str, LoraRecord] | None, pair_lora: LoraRecord, merge_method: str = ""
) -> tuple[list[Variant], list[str]]:
    """The ``MODULAR_VARIANTS`` among ``names`` and notes for the report. ``modular``: the lora stage's records
    of the naive merge and the merge (``pipeline.lora.modular.read_modular``); None for a pair trained from photos,
    whose modular variants are skipped with a note. ``pair_lora``: the pair's LoRA (the fine-tuned merge)."""
    wanted = [name for name in names if name in MODULAR_VARIANTS]
    if not wanted:
        return [], []
    if modular is None:
        return [], [f"{', '.join(wanted)}: skipped (only for pairs given as character LoRA files)"]
    method = f" ({merge_method})" if merge_method else ""
    made = {
        "naive_merge": Variant(
            "naive_merge", modular["naive_merge"], None, "naive_merge: both character LoRAs loaded at once"
        ),
        "merged": Variant("merged", modular["merged"], None, f"merged: the character LoRAs merged{method}"),
        "merged_segmix": Variant(
            "merged_segmix", pair_lora, None, "merged_segmix: the merge fine-tuned with Seg-Mix and KL towards it"
        ),
    }
    return [made[name] for name in wanted], []


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def training_settings(
    variants: Sequence[Variant],
    segmix_lora: LoraRecord | None,
    family: str | None = None,
    base_model: str | None = None,
) -> pd.DataFrame:
    """Per variant (``TRAINING_COLUMNS``): the model family and base model it renders with (None: not stated), its
    LoRA version, steps trained, Seg-Mix probability and every training setting that differs from ``segmix_lora``'s
    (None: nothing to compare with). A variant whose record lacks complete settings says so in its row;
    ``segmix_lora`` itself must have them."""
    reference = segmix_lora.train_config() if segmix_lora is not None else None
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"variant": variant.name, "family": family, "base_model": base_model}
        row |= {"lora": "base model (no LoRA)", "steps": None}
        row |= {"segmix_p": None, "differs_from_segmix": "—"}
        if variant.name in MERGE_ONLY_VARIANTS:  # a merge of LoRA files: nothing trained, nothing to compare
            rows.append({**row, "lora": variant.lora.version, "differs_from_segmix": MERGE_NOT_TRAINED})
            continue
        if variant.lora is not None:
            try:
                config = variant.lora.train_config()
            except CastloraError as exc:  # e.g. a LoRA recorded by an older castlora: said so, not guessed
                rows.append({**row, "lora": variant.lora.version, "differs_from_segmix": f"unknown: {exc}"})
                continue
            steps = variant.lora.steps if variant.lora.steps is not None else config.steps
            row |= {
                "lora": variant.lora.version,
                "steps": steps if steps == config.steps else f"{steps} of {config.steps}",
                "segmix_p": config.segmix_p,
            }
            if reference is not None:
                differences = reference.differences(config)
                row["differs_from_segmix"] = (
                    "; ".join(f"{k}: {_setting(a)} → {_setting(b)}" for k, (a, b) in differences.items()) or "nothing"
                )
        rows.append(row)
    # object dtype: a merge row has no steps, and a float column would show every step count as "250.000"
    return pd.DataFrame(rows, columns=list(TRAINING_COLUMNS), dtype=object)


def clip_text(prompt: str, subjects: Sequence[Subject]) -> str:
    """The prompt as CLIP should read it: identifiers mean nothing to CLIP, so each token phrase becomes its noun."""
    for subject in sorted(subjects, key=lambda s: -len(s.token_phrase)):
        prompt = re.sub(re.escape(subject.token_phrase), subject.class_noun, prompt, flags=re.IGNORECASE)
    return prompt


def image_reward_note(source: str) -> str:
    """Why ImageReward is not reported: it is never silently replaced by another score."""
    if not source:
        return "no ImageReward weights configured (model preset field image_reward)"
    return (
        f"ImageReward weights are configured ({source}) but castlora does not run ImageReward yet "
        "(its package is not a dependency); the metric is left out"
    )


def _row(variant: str, image: dict[str, Any], metric: str, subject: str, value: float, status: str, note: str = ""):
    return {
        "variant": variant,
        "image_path": image["path"],
        "prompt_index": int(image["prompt_index"]),
        "prompt": image["prompt"],
        "seed": int(image["seed"]),
        "metric": metric,
        "subject": subject,
        "value": float(value) if status == OK else float("nan"),
        "status": status,
        "note": note,
    }


def subject_similarity(record: dict[str, Any], subject_index: int) -> float | None:
    """Similarity of the box D&C gave to the subject; without an assignment (count gate failed), the subject's
    best-matching box; None when nothing was detected."""
    similarities = np.asarray(json.loads(record["S_json"]), dtype=np.float64)
    if similarities.size == 0:
        return None
    assignment = json.loads(record["assignment_json"]) if record.get("assignment_json") else None
    if assignment:
        return float(similarities[assignment[subject_index], subject_index])
    return float(similarities[:, subject_index].max())


def metric_rows(
    variant: str,
    manifest: pd.DataFrame,
    records: pd.DataFrame,
    subjects: Sequence[Subject],
    unavailable_embedders: dict[str, str],
    clip_t: np.ndarray | None,
    clip_t_note: str,
    image_reward_note: str,
) -> list[dict[str, Any]]:
    """The long-format metric rows of one variant's images (schema in ``pipeline.evaluation.report``)."""
    rows: list[dict[str, Any]] = []
    images = manifest.reset_index(drop=True).to_dict("records")
    by_image = {index: group for index, group in records.groupby("image_index")}
    gate_embedder = sorted(records["embedder"].unique())[0] if len(records) else None
    for index, image in enumerate(images):
        group = by_image.get(index, pd.DataFrame(columns=records.columns))
        for record in group.to_dict("records"):
            rows.append(_row(variant, image, f"dnc_{record['mode']}:{record['embedder']}", "", record["score"], OK))
            if record["mode"] != "default":
                continue
            for j, subject in enumerate(subjects):
                value = subject_similarity(record, j)
                status, note = (OK, "") if value is not None else (UNDEFINED, "no box detected")
                rows.append(
                    _row(variant, image, f"subject_sim:{record['embedder']}", subject.name, value or 0, status, note)
                )
            if record["embedder"] == gate_embedder:
                rows.append(_row(variant, image, "count_fail", "", float(pd.notna(record["reason"])), OK))
        for name, why in unavailable_embedders.items():
            for mode in ("default", "mudi"):
                rows.append(_row(variant, image, f"dnc_{mode}:{name}", "", 0, UNAVAILABLE, why))
            for subject in subjects:
                rows.append(_row(variant, image, f"subject_sim:{name}", subject.name, 0, UNAVAILABLE, why))
        if clip_t is not None:
            rows.append(_row(variant, image, "clip_t", "", clip_t[index], OK))
        else:
            rows.append(_row(variant, image, "clip_t", "", 0, UNAVAILABLE, clip_t_note))
        rows.append(_row(variant, image, "image_reward", "", 0, UNAVAILABLE, image_reward_note))
    return rows


def _annotation(record: dict[str, Any], subjects: Sequence[Subject]) -> tuple[list, list[str], list]:
    """Boxes with the assigned character's name and colour; unassigned boxes grey with the detector's label."""
    boxes = json.loads(record["boxes_json"])
    assignment = json.loads(record["assignment_json"]) if record.get("assignment_json") else None
    labels, colours = box_annotations(
        len(boxes), assignment, [s.name for s in subjects], json.loads(record["labels_json"])
    )
    return boxes, labels, colours


def run_evaluation(
    *,
    pipe_factory: Callable[[], Any],
    variants: Sequence[Variant],
    scoring: EvaluationScoring,
    layout_factory: Callable[[int], Layout],
    generation: GenerationSettings,
    seeds: Sequence[int],
    subjects: Sequence[Subject],
    out_dir: Path,
    recorder: LineageRecorder,
    base_model_id: str,
    report: EvaluationReport = EvaluationReport(),
    log: Callable[[str], None] = print,
    family: str | None = None,
) -> EvaluationOutput:
    """Render every variant on the grid, score it, and write metrics.parquet, summary.parquet, report.md, plots
    and annotated grids into ``out_dir``. The report's training table compares each variant's settings with
    ``report.segmix_lora``'s and names each variant's ``family`` and base model (``base_model_id``)."""
    if not variants:
        raise CastloraError(f"Evaluation needs at least one variant ({', '.join(VARIANTS)}).")
    if not generation.prompts or not seeds:
        raise CastloraError("Evaluation needs at least one prompt and one seed for its grid.")
    training = training_settings(
        variants, report.segmix_lora, family, base_model_id
    )  # before rendering: a record without settings fails
    out_dir = Path(out_dir)
    layout_factory = functools.cache(layout_factory)  # one composite per seed, shared by every variant
    rows: list[dict[str, Any]] = []
    grid_items: dict[str, list] = {}
    for variant in variants:
        log(f"evaluation: rendering {len(generation.prompts)} prompts x {len(seeds)} seeds for {variant.name}")
        pipe = pipe_factory()
        if variant.lora is not None:
            pipe.load_lora_weights(str(variant.lora.diffusers))
        manifest = render_samples(
            pipe=pipe,
            prompts=list(generation.prompts),
            seeds=list(seeds),
            images_per_prompt=len(seeds),
            layout_factory=layout_factory if variant.gamma is not None else None,
            gamma=variant.gamma,
            settings=generation.render_settings(),
            lora_version=variant.lora.version if variant.lora else "base",
            lora_sha256=variant.lora.diffusers_sha256 if variant.lora else None,
            out_dir=out_dir / variant.name,
            recorder=recorder,
            model_ids=[base_model_id],
        )
        del pipe  # one base model in memory at a time
        release_memory()
        images = [Image.open(p).convert("RGB") for p in manifest["path"]]
        # Every variant is judged against the same per-seed layout (used by the layout fallback detector).
        boxes = [layout_factory(int(seed)).boxes for seed in manifest["seed"]]
        records = scoring.scorer.score(images, boxes)
        write_manifest(records, out_dir / variant.name, "dnc.parquet")
        texts = [clip_text(p, subjects) for p in manifest["prompt"]]
        clip_t = scoring.clip_text_image(images, texts) if scoring.clip_text_image is not None else None
        rows.extend(
            metric_rows(
                variant.name,
                manifest,
                records,
                subjects,
                scoring.unavailable_embedders,
                clip_t,
                scoring.clip_t_note,
                scoring.image_reward_note,
            )
        )
        grid_items[variant.name] = _grid_items(variant.name, images, manifest, records, subjects)

    metrics = pd.DataFrame(rows)
    write_manifest(metrics, out_dir, "metrics.parquet")
    summary = summarize(metrics)
    plots_dir = out_dir / "plots"
    plots = {}
    for metric in sorted(m for m in metrics["metric"].unique() if m.startswith("dnc_")):
        plots[metric] = plot_score_distributions(metrics, metric, plots_dir / f"{metric.replace(':', '_')}.png")
    if report.rounds is not None and len(report.rounds):
        plots["rounds"] = plot_rounds(
            report.rounds, plots_dir / "rounds.png", distance_threshold=report.distance_fraction
        )
    grids = {}
    for name, items in grid_items.items():
        path = out_dir / "grids" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        annotated_grid(items, columns=4, cell_size=192).save(path)
        grids[name] = path
    all_notes = [*(v.note for v in variants if v.note), *report.notes]
    markdown = render_markdown(summary, availability(metrics), report.rounds, report.title, all_notes, training)
    (out_dir / "report.md").write_text(markdown)
    return EvaluationOutput(out_dir, metrics, summary, markdown, plots, grids, training)


def _grid_items(name, images, manifest, records, subjects, limit: int = 8) -> list:
    """(image, boxes, labels, caption) of the first images, boxes from the default mode's first embedder."""
    if len(records):
        first = sorted(records["embedder"].unique())[0]
        chosen = records[(records["mode"] == "default") & (records["embedder"] == first)].set_index("image_index")
    items = []
    for index, image in enumerate(images[:limit]):
        boxes, labels, colours, score = [], [], [], float("nan")
        if len(records) and index in chosen.index:
            record = chosen.loc[index].to_dict()
            boxes, labels, colours = _annotation(record, subjects)
            score = record["score"]
        seed = int(manifest.iloc[index]["seed"])
        items.append((image, boxes, labels, f"{name} s{seed} D&C {score:.3f}", colours))
    return items
