"""Training data in aspect-ratio buckets (docs/design.md#aspect-ratio-buckets): which bucket each sample is in, and
the content-keyed latents and masks of every (sample, bucket) a step may draw."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from pipeline.buckets import Bucket, image_size, nearest_bucket
from pipeline.errors import CastloraError
from pipeline.train.caches import CachedLatent, CacheStats, build_latent_cache, load_masks
from pipeline.train.data import BucketedPools, TrainingSample

BucketKey = tuple[str, Bucket]
"""(sample id, bucket): a prior sample may be cached in several buckets (``BucketedPools``)."""


def place_samples(samples: Sequence[TrainingSample], buckets: Sequence[Bucket]) -> BucketedPools:
    """Each sample's bucket: the one nearest its aspect ratio (read from the image header); with one bucket
    (``buckets: square``) every sample's, without opening a file."""
    if len(buckets) == 1:
        home = dict.fromkeys((s.sample_id for s in samples), buckets[0])
    else:
        home = {s.sample_id: nearest_bucket(*image_size(s.image_path), buckets) for s in samples}
    return BucketedPools.of(samples, home)


def build_bucketed_latents(
    vae: torch.nn.Module,
    bucketed: BucketedPools,
    resolution: int,
    cache_dir: Path,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[BucketKey, CachedLatent], dict[str, int]]:
    """``build_latent_cache`` for every bucket and the samples placed in it, one bucket at a time; the statistics
    (``latent_hits``, ``latent_misses`` and how many ``buckets`` steps draw from) for the run's metrics."""
    result: dict[BucketKey, CachedLatent] = {}
    total = CacheStats()
    for bucket, group in bucketed.placements().items():
        latents, stats = build_latent_cache(vae, group, resolution, cache_dir, encode, bucket)
        result.update({(sample_id, bucket): entry for sample_id, entry in latents.items()})
        total.hits, total.misses = total.hits + stats.hits, total.misses + stats.misses
    return result, {"latent_hits": total.hits, "latent_misses": total.misses, "buckets": len(bucketed.by_bucket)}


def load_bucketed_masks(
    bucketed: BucketedPools, latents: Mapping[BucketKey, CachedLatent]
) -> dict[BucketKey, torch.Tensor]:
    """The masked loss's masks of every placed sample that has one, on its bucket's latent grid."""
    masks: dict[BucketKey, torch.Tensor] = {}
    for bucket, group in bucketed.placements().items():
        latent_size = tuple(latents[(group[0].sample_id, bucket)].latent.shape[-2:])
        masks.update({(key, bucket): mask for key, mask in load_masks(group, bucket, latent_size).items()})
    return masks


def bucket_latents(
    latents: Mapping[BucketKey, CachedLatent], chosen: Sequence[TrainingSample], bucket: Bucket
) -> list[CachedLatent]:
    """The latents of ``chosen`` in ``bucket``; one missing means the batch would mix shapes, refused."""
    missing = [s.image_path for s in chosen if (s.sample_id, bucket) not in latents]
    if missing:
        raise CastloraError(
            f"A training batch mixes aspect-ratio buckets: {missing} have no latent in bucket {bucket}; draw each "
            "batch from one bucket (plan_bucketed_step), or set buckets='square'."
        )
    return [latents[(s.sample_id, bucket)] for s in chosen]
