"""Training samples and the deterministic per-step data plan.

The plan is a pure function of (seed, step): resuming at step N replays exactly the batches an
uninterrupted run would have seen, so the "data position" of a checkpoint is just its step.

Reading samples from the stage manifests lives in ``pipeline.train.training_set``: it needs pandas and the
segmentation stage, which a training process (every ``accelerate`` rank, a script) should not import —
they cost ~90 MiB of RSS and ~0.3 s of start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import CastloraError

INSTANCE = "instance"
SEGMIX = "segmix"
PRIOR = "prior"
PRIOR_SEGMIX = "prior_segmix"
KINDS = (INSTANCE, SEGMIX, PRIOR, PRIOR_SEGMIX)
PRIOR_KINDS = (PRIOR, PRIOR_SEGMIX)
SEGMIX_DRAWS = ("shared", "independent")
"""How a step decides Seg-Mix: ``shared`` = one draw per (instance, prior) slot, as MuDI does (its dataset
item holds both images and one ``random() < p`` decides for the pair); ``independent`` = one draw per image."""


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

    def check(self, prior_preservation: bool, segmix_p: float = 0.0) -> None:
        if not self.by_kind[INSTANCE] and not self.by_kind[SEGMIX]:
            raise CastloraError("No instance samples to train on: materialize 'references' and 'captions' first.")
        if segmix_p > 0 and not self.by_kind[SEGMIX]:
            raise CastloraError(
                f"segmix_p={segmix_p} asks for Seg-Mix composites but the Seg-Mix bank ('segmix_bank') holds no "
                "instance composites: materialize 'segmix_bank' with n_instance > 0, or set segmix_p=0 to train "
                "without Seg-Mix."
            )
        if prior_preservation and not self.by_kind[PRIOR] and not self.by_kind[PRIOR_SEGMIX]:
            raise CastloraError(
                "Prior preservation is on (prior_weight > 0) but there are no class images or prior Seg-Mix "
                "composites: materialize 'class_images' and 'segmix_bank', or set prior_weight=0."
            )


def _pick(rng: np.random.Generator, pools: SamplePools, plain: str, mixed: str, use_mixed: bool) -> TrainingSample:
    """A Seg-Mix composite if ``use_mixed`` (and the bank has one of this kind), else a plain image.

    A missing kind falls back to the other: a bank without prior composites (``n_prior: 0``) keeps plain class
    images in the prior slot. An empty instance bank with ``segmix_p > 0`` is refused by ``SamplePools.check``.
    """
    plain_pool, mixed_pool = pools.by_kind[plain], pools.by_kind[mixed]
    pool = mixed_pool if (use_mixed and mixed_pool) or not plain_pool else plain_pool
    return pool[int(rng.integers(len(pool)))]


def plan_step(
    pools: SamplePools,
    seed: int,
    step: int,
    batch_size: int,
    segmix_p: float,
    prior: bool,
    segmix_draw: str = "shared",
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """The (instance, prior) samples of one step's global batch; a pure function of its arguments.

    ``segmix_draw`` (``SEGMIX_DRAWS``): ``shared`` decides Seg-Mix once for instance slot i and prior slot i
    together (MuDI), ``independent`` once for each image.
    """
    if segmix_draw not in SEGMIX_DRAWS:
        raise CastloraError(f"segmix_draw={segmix_draw!r} must be one of {SEGMIX_DRAWS}.")
    rng = np.random.default_rng([seed, step, 0xDA7A])
    if segmix_draw == "independent":
        instance = [_pick(rng, pools, INSTANCE, SEGMIX, rng.random() < segmix_p) for _ in range(batch_size)]
        draws = range(batch_size) if prior else range(0)
        return instance, [_pick(rng, pools, PRIOR, PRIOR_SEGMIX, rng.random() < segmix_p) for _ in draws]
    mixed = [bool(rng.random() < segmix_p) for _ in range(batch_size)]
    instance = [_pick(rng, pools, INSTANCE, SEGMIX, use) for use in mixed]
    priors = [_pick(rng, pools, PRIOR, PRIOR_SEGMIX, use) for use in mixed] if prior else []
    return instance, priors


@dataclass(frozen=True)
class BucketedPools:
    """The samples split by aspect-ratio bucket (docs/design.md#aspect-ratio-buckets), for drawing each micro-batch
    from one bucket: a batch of mixed shapes cannot be stacked.

    ``by_bucket`` has one ``SamplePools`` per bucket that holds an instance photo or composite: that bucket's
    own samples, and — when it holds no class image or prior composite — every prior sample (it is brought to
    this bucket too, so prior preservation does not stop on the steps of a bucket the class images are not in).
    """

    pools: SamplePools
    """All samples, as ``plan_step`` draws them without buckets."""
    by_bucket: dict[Any, SamplePools]
    home: dict[str, Any]
    """Sample id -> its own bucket (the one nearest its aspect ratio)."""

    @classmethod
    def of(cls, samples: Sequence[TrainingSample], home: Mapping[str, Any]) -> BucketedPools:
        pools = SamplePools.of(samples)
        priors = [s for s in samples if s.is_prior]
        buckets = sorted({home[s.sample_id] for s in samples if not s.is_prior})
        by_bucket = {}
        for bucket in buckets:
            own = [s for s in samples if home[s.sample_id] == bucket]
            if not any(s.is_prior for s in own):
                own += priors
            by_bucket[bucket] = SamplePools.of(own)
        return cls(pools, by_bucket, dict(home))

    def placements(self) -> dict[Any, list[TrainingSample]]:
        """Bucket -> the samples brought to it: each sample in its own bucket, and the prior samples a step in a
        bucket may draw there too. What the latent cache must hold."""
        placed: dict[Any, set[TrainingSample]] = {}
        for kind in self.pools.by_kind.values():
            for sample in kind:
                placed.setdefault(self.home[sample.sample_id], set()).add(sample)
        for bucket, pools in self.by_bucket.items():
            placed.setdefault(bucket, set()).update(s for kind in pools.by_kind.values() for s in kind)
        return {bucket: sorted(placed[bucket], key=lambda s: s.sample_id) for bucket in sorted(placed)}


def plan_bucketed_step(
    bucketed: BucketedPools,
    seed: int,
    step: int,
    batch_size: int,
    segmix_p: float,
    prior: bool,
    segmix_draw: str = "shared",
) -> tuple[Any, list[TrainingSample], list[TrainingSample]]:
    """(bucket, instance samples, prior samples) of one step's global batch, every sample from that bucket.

    The bucket is that of a pilot sample drawn as the first instance slot would be without buckets (Seg-Mix with
    probability ``segmix_p``), so buckets come up as often as their photos and composites would; the slots are
    then ``plan_step``'s within the bucket. With one bucket this is exactly ``plan_step`` (no extra draw)."""
    if len(bucketed.by_bucket) == 1:
        (bucket, pools), *_ = bucketed.by_bucket.items()
    else:
        rng = np.random.default_rng([seed, step, 0xB0C7])
        pilot = _pick(rng, bucketed.pools, INSTANCE, SEGMIX, bool(rng.random() < segmix_p))
        bucket = bucketed.home[pilot.sample_id]
        pools = bucketed.by_bucket[bucket]
    instance, priors = plan_step(pools, seed, step, batch_size, segmix_p, prior, segmix_draw)
    return bucket, instance, priors


def samples_fingerprint_items(samples: Sequence[TrainingSample]) -> list[tuple[str, str, str]]:
    """What of the samples changes training (ids, kinds, prompts), in a stable order; paths do not matter."""
    return sorted({(s.sample_id, s.kind, s.prompt) for s in samples})
