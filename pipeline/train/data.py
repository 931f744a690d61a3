"""Training samples from the stage manifests, and the deterministic per-step data plan.

The plan is a pure function of (seed, step): resuming at step N replays exactly the batches an
uninterrupted run would have seen, so the "data position" of a checkpoint is just its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import CastloraError
from pipeline.manifest import read_manifest
from pipeline.stages.segments import USABLE

INSTANCE = "instance"
SEGMIX = "segmix"
PRIOR = "prior"
PRIOR_SEGMIX = "prior_segmix"
KINDS = (INSTANCE, SEGMIX, PRIOR, PRIOR_SEGMIX)
PRIOR_KINDS = (PRIOR, PRIOR_SEGMIX)


@dataclass(frozen=True)
class TrainingSample:
    sample_id: str
    """SHA-256 of the image file's bytes: the key of every cache entry derived from the image."""
    image_path: str
    prompt: str
    kind: str
    mask_path: str | None = None
    """Subject (union) mask for the masked loss; None = the whole image counts."""

    @property
    def is_prior(self) -> bool:
        return self.kind in PRIOR_KINDS


def prior_prompt(class_noun: str) -> str:
    return f"a photo of a {class_noun}"


def _optional(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def build_samples(
    references: pd.DataFrame,
    captions: pd.DataFrame,
    segmix_bank: pd.DataFrame | None = None,
    class_images: pd.DataFrame | None = None,
    segments: pd.DataFrame | None = None,
) -> list[TrainingSample]:
    """One sample per reference photo (with its caption), bank composite and class image.

    ``segments`` (optional) supplies the reference masks for the masked loss; class images carry their own.
    """
    caption_of = dict(zip(captions["reference_sha256"], captions["caption"], strict=True))
    mask_of: dict[str, str | None] = {}
    if segments is not None and len(segments):
        usable = segments[segments["status"] == USABLE]
        mask_of = {str(p): _optional(m) for p, m in zip(usable["reference_path"], usable["mask_path"], strict=True)}
    samples = []
    for row in references.to_dict("records"):
        if row["sha256"] not in caption_of:
            raise CastloraError(
                f"Reference {row['path']} has no caption in the captions manifest: re-materialize 'captions'."
            )
        samples.append(
            TrainingSample(row["sha256"], row["path"], caption_of[row["sha256"]], INSTANCE, mask_of.get(row["path"]))
        )
    if segmix_bank is not None:
        for row in segmix_bank.to_dict("records"):
            kind = SEGMIX if row["kind"] == "instance" else PRIOR_SEGMIX
            samples.append(
                TrainingSample(row["image_sha256"], row["image_path"], row["prompt"], kind, row["union_mask_path"])
            )
    if class_images is not None:
        for row in class_images.to_dict("records"):
            mask = _optional(row.get("mask_path")) if row.get("status") == USABLE else None
            samples.append(TrainingSample(row["sha256"], row["path"], prior_prompt(row["class_noun"]), PRIOR, mask))
    return samples


def load_samples(pair_dir: Path, with_prior: bool = True) -> list[TrainingSample]:
    """Samples of a pair from its stage folders (``references``, ``captions``, ``segments``, ``segmix_bank``,
    ``class_images``); the bank and class images are optional, references and captions are required."""
    pair_dir = Path(pair_dir)

    def optional(stage: str) -> pd.DataFrame | None:
        path = pair_dir / stage
        return read_manifest(path, stage) if (path / "manifest.parquet").is_file() else None

    samples = build_samples(
        read_manifest(pair_dir / "references", "references"),
        read_manifest(pair_dir / "captions", "captions"),
        optional("segmix_bank"),
        optional("class_images") if with_prior else None,
        optional("segments"),
    )
    return samples if with_prior else [s for s in samples if not s.is_prior]


@dataclass(frozen=True)
class SamplePools:
    """Samples sorted by id within each kind, so the plan does not depend on manifest row order."""

    by_kind: dict[str, tuple[TrainingSample, ...]]

    @classmethod
    def of(cls, samples: Sequence[TrainingSample]) -> SamplePools:
        by_kind = {
            kind: tuple(sorted((s for s in samples if s.kind == kind), key=lambda s: s.sample_id)) for kind in KINDS
        }
        return cls(by_kind)

    def check(self, prior_preservation: bool) -> None:
        if not self.by_kind[INSTANCE] and not self.by_kind[SEGMIX]:
            raise CastloraError("No instance samples to train on: materialize 'references' and 'captions' first.")
        if prior_preservation and not self.by_kind[PRIOR] and not self.by_kind[PRIOR_SEGMIX]:
            raise CastloraError(
                "Prior preservation is on (prior_weight > 0) but there are no class images or prior Seg-Mix "
                "composites: materialize 'class_images' and 'segmix_bank', or set prior_weight=0."
            )


def _choose(rng: np.random.Generator, pools: SamplePools, plain: str, mixed: str, segmix_p: float) -> TrainingSample:
    """A Seg-Mix composite with probability ``segmix_p`` (when the bank has any), else a plain image."""
    plain_pool, mixed_pool = pools.by_kind[plain], pools.by_kind[mixed]
    use_mixed = rng.random() < segmix_p
    pool = mixed_pool if (use_mixed and mixed_pool) or not plain_pool else plain_pool
    return pool[int(rng.integers(len(pool)))]


def plan_step(
    pools: SamplePools, seed: int, step: int, batch_size: int, segmix_p: float, prior: bool
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """The (instance, prior) samples of one step's global batch; a pure function of its arguments."""
    rng = np.random.default_rng([seed, step, 0xDA7A])
    instance = [_choose(rng, pools, INSTANCE, SEGMIX, segmix_p) for _ in range(batch_size)]
    priors = [_choose(rng, pools, PRIOR, PRIOR_SEGMIX, segmix_p) for _ in range(batch_size)] if prior else []
    return instance, priors


def samples_fingerprint_items(samples: Sequence[TrainingSample]) -> list[tuple[str, str, str]]:
    """What of the samples changes training (ids, kinds, prompts), in a stable order; paths do not matter."""
    return sorted({(s.sample_id, s.kind, s.prompt) for s in samples})
