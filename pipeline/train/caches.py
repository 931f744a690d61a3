"""Content-addressed caches of model latents and prompt embeddings, built once before training through the
model family's encoders (docs/design.md#model-families).

Every entry is keyed by *what it was computed from* (image bytes' SHA-256 + bucket and crop + VAE identity;
prompt text + text-encoder identity), never by a dataloader index or step: diffusers' ``--cache_latents``
pairs latents with the wrong captions once the data is shuffled (diffusers #14430, #12124). Each file also
records its own key, checked on read, so a misplaced file is recomputed instead of trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from pipeline.buckets import Bucket, cover_crop, fit_to_bucket, image_size
from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.images import load_mask, to_rgb
from pipeline.models.identity import module_identity
from pipeline.models.inputs import module_device
from pipeline.models.latents import encode_to_model_latents
from pipeline.storage.atomic import atomic_path
from pipeline.storage.hashing import sha256_file, sha256_json
from pipeline.train.data import TrainingSample

ENCODE_BATCH = 8
"""Images per VAE encode on CUDA. On CPU batching buys no speed but multiplies the encoder's activation memory
(tiny SDXL at 1024 px, 5 photos: peak RSS 2451 MiB batched vs 1659 MiB one at a time), so CPU encodes one by one."""


def _center_crop_geometry(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the square policy for a ``width`` × ``height`` image."""
    geometry = cover_crop(width, height, Bucket(resolution, resolution))
    return *geometry.resized, geometry.left, geometry.top


def center_crop_top_left(original_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centre crop in the resized image, for an image of (height, width) ``original_size``:
    SDXL's ``crops_coords_top_left`` micro-conditioning."""
    height, width = original_size
    _, _, left, top = _center_crop_geometry(width, height, resolution)
    return top, left


def center_crop_resize(image: Image.Image, resolution: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``resolution`` and crop the centre square (the square bucket)."""
    return fit_to_bucket(image, Bucket(resolution, resolution), resample)


def _as_bucket(size: int | Bucket) -> Bucket:
    return size if isinstance(size, Bucket) else Bucket(size, size)


def load_training_image(path: str | Path, size: int | Bucket) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixels in [-1, 1] as (3, H, W), brought to ``size`` (a bucket, or a square side), and the original
    (height, width), which SDXL conditions on."""
    with Image.open(path) as opened:
        image = to_rgb(opened.copy())  # copy: to_rgb may return the lazily-loaded file itself
    original = (image.height, image.width)
    pixels = np.asarray(fit_to_bucket(image, _as_bucket(size)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), original


def load_training_mask(path: str | Path, size: int | Bucket, latent_size: int | tuple[int, int]) -> torch.Tensor:
    """The subject mask cropped like its image (to ``size``, a bucket or a square side) and averaged down to the
    latent grid (``latent_size``: a side, or (h, w)), as (1, h, w) in [0, 1]."""
    mask = Image.fromarray((load_mask(path) * 255).astype(np.uint8))
    cropped = fit_to_bucket(mask, _as_bucket(size), Image.Resampling.NEAREST)
    tensor = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(tensor, latent_size)[0]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, key: str) -> None:
    with atomic_path(path) as temporary:  # concurrent writers (DDP ranks) each replace with identical content
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata={"key": key})


def _read_entry(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The entry's tensors if the file exists, is readable and records ``key``; else None (recompute)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


LATENT_CACHE_FORMAT = 3
"""2: entries record the centre crop's (top, left) and latents are normalised by ``pipeline.models.latents``
(latents_mean/std included). 3: the key holds the bucket (width, height) and the crop's (top, left), the folder
the bucket (docs/design.md#aspect-ratio-buckets). Part of every entry's key and folder, so older entries are
recomputed."""


@dataclass(frozen=True)
class CachedLatent:
    latent: torch.Tensor
    """(C, h, w) float32 model latents (``ModelFamily.encode_pixels``; C = 4 for SDXL)."""
    original_size: tuple[int, int]
    """(height, width) of the source image."""
    crop_top_left: tuple[int, int] = (0, 0)
    """(top, left) of the crop in the resized image (SDXL's crop conditioning)."""


@dataclass(frozen=True)
class CachedText:
    prompt_embeds: torch.Tensor
    """(L, D) token embeddings (SDXL: (77, D1 + D2), both text encoders' penultimate hidden states)."""
    pooled: torch.Tensor
    """(P,) pooled embedding (SDXL: text encoder 2's projected pooled output)."""


@dataclass
class LatentCache:
    """Latents of one bucket (``bucket``; None = the square ``resolution``): an entry's key is the image's hash,
    the bucket, the crop, the VAE and the format, so another bucket or crop is another entry."""

    root: Path
    vae_id: str
    resolution: int
    stats: CacheStats = field(default_factory=CacheStats)
    bucket: Bucket | None = None

    @property
    def size(self) -> Bucket:
        return self.bucket or Bucket(self.resolution, self.resolution)

    def key(self, image_sha256: str, crop_top_left: tuple[int, int]) -> str:
        size = self.size
        return sha256_json(
            {
                "image": image_sha256,
                "bucket": [size.width, size.height],
                "crop": list(crop_top_left),
                "vae": self.vae_id,
                "format": LATENT_CACHE_FORMAT,
            }
        )

    def path(self, image_sha256: str) -> Path:
        folder = f"v{LATENT_CACHE_FORMAT}-{self.size}px-{self.vae_id[:12]}"
        return self.root / "latents" / folder / f"{image_sha256}.safetensors"

    def get(self, image_sha256: str, crop_top_left: tuple[int, int]) -> CachedLatent | None:
        entry = _read_entry(self.path(image_sha256), self.key(image_sha256, crop_top_left))
        if entry is None:
            return None
        size, crop = entry["original_size"], entry["crop_top_left"]
        return CachedLatent(entry["latent"], (int(size[0]), int(size[1])), (int(crop[0]), int(crop[1])))

    def put(self, image_sha256: str, value: CachedLatent) -> None:
        tensors = {
            "latent": value.latent.float().cpu(),
            "original_size": torch.tensor(value.original_size),
            "crop_top_left": torch.tensor(value.crop_top_left),
        }
        _atomic_save(tensors, self.path(image_sha256), self.key(image_sha256, value.crop_top_left))


@dataclass
class TextCache:
    root: Path
    encoders_id: str
    stats: CacheStats = field(default_factory=CacheStats)

    def key(self, prompt: str) -> str:
        return sha256_json({"prompt": prompt, "text_encoders": self.encoders_id})

    def path(self, prompt: str) -> Path:
        return self.root / "text" / self.encoders_id[:12] / f"{self.key(prompt)}.safetensors"

    def get(self, prompt: str) -> CachedText | None:
        entry = _read_entry(self.path(prompt), self.key(prompt))
        return None if entry is None else CachedText(entry["prompt_embeds"], entry["pooled"])

    def put(self, prompt: str, value: CachedText) -> None:
        tensors = {"prompt_embeds": value.prompt_embeds.float().cpu(), "pooled": value.pooled.float().cpu()}
        _atomic_save(tensors, self.path(prompt), self.key(prompt))


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Model latents (distribution mean, normalised as inference normalises them) of ``pixels`` (N, 3, H, W) in
    [-1, 1], computed in float32 (SDXL's VAE overflows in fp16: docs/design.md#content-hash-caches), on the CPU."""
    return encode_to_model_latents(vae, pixels).cpu()


def build_latent_cache(
    vae: torch.nn.Module,
    samples: Sequence[TrainingSample],
    resolution: int,
    cache_dir: Path,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bucket: Bucket | None = None,
) -> tuple[dict[str, CachedLatent], CacheStats]:
    """Latents for every distinct image of ``samples`` brought to ``bucket`` (None: the square ``resolution``), by
    sample id; encodes only what the cache lacks.

    ``encode`` maps pixels to model latents: the family's ``encode_pixels`` bound to its pipeline (the trainer
    passes it); without it, ``vae``'s normalised latents (``encode_images``). ``vae`` keys the entries."""
    cache = LatentCache(Path(cache_dir), module_identity(vae), resolution, bucket=bucket)
    size = cache.size
    by_id = {s.sample_id: s for s in samples}
    result: dict[str, CachedLatent] = {}
    missing = []
    for sample_id in sorted(by_id):
        width, height = image_size(by_id[sample_id].image_path)  # header only: the crop is part of the key
        crop = cover_crop(width, height, size)
        cached = cache.get(sample_id, (crop.top, crop.left))
        if cached is None:
            missing.append(by_id[sample_id])
        else:
            result[sample_id] = cached
    cache.stats.hits = len(result)
    cache.stats.misses = len(missing)
    batch = ENCODE_BATCH if next(vae.parameters()).device.type == "cuda" else 1
    for chunk in _batches(missing, batch):
        loaded = []
        for sample in chunk:
            actual = sha256_file(sample.image_path)
            if actual != sample.sample_id:
                raise CastloraError(
                    f"{sample.image_path} changed since its manifest was written (sha256 {actual[:12]}…, manifest "
                    f"says {sample.sample_id[:12]}…): re-materialize the stage that wrote it."
                )
            loaded.append(load_training_image(sample.image_path, size))
        pixels = torch.stack([pixels for pixels, _ in loaded])
        latents = encode_images(vae, pixels) if encode is None else encode(pixels).cpu()
        for sample, latent, (_, original) in zip(chunk, latents, loaded, strict=True):
            crop = cover_crop(original[1], original[0], size)
            entry = CachedLatent(latent.clone(), original, (crop.top, crop.left))
            cache.put(sample.sample_id, entry)
            result[sample.sample_id] = entry
    return result, cache.stats


def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings, pooled embeddings) of ``prompts`` exactly as ``pipe``'s family computes them at
    inference (no CFG)."""
    return family_for(pipe).encode_prompts(pipe, prompts, device)


def build_text_cache(pipe, prompts: Iterable[str], cache_dir: Path) -> tuple[dict[str, CachedText], CacheStats]:
    """Embeddings of every distinct prompt, by prompt text; encodes only what the cache lacks."""
    family = family_for(pipe)
    cache = TextCache(Path(cache_dir), family.prompt_encoder_identity(pipe))
    result: dict[str, CachedText] = {}
    missing = []
    for prompt in sorted(set(prompts)):
        cached = cache.get(prompt)
        if cached is None:
            missing.append(prompt)
        else:
            result[prompt] = cached
    cache.stats.hits, cache.stats.misses = len(result), len(missing)
    device = module_device(family.component(pipe, family.text_encoders[-1]))
    for chunk in _batches(missing, ENCODE_BATCH):
        with torch.no_grad():
            embeds, pooled = family.encode_prompts(pipe, chunk, device)
        for prompt, e, p in zip(chunk, embeds, pooled, strict=True):
            entry = CachedText(e.float().cpu().clone(), p.float().cpu().clone())
            cache.put(prompt, entry)
            result[prompt] = entry
    return result, cache.stats


def load_masks(
    samples: Sequence[TrainingSample], size: int | Bucket, latent_size: int | tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Latent-grid masks by sample id (only samples that have one), cropped like their images to ``size`` (a bucket
    or a square side); small enough to keep in memory."""
    return {s.sample_id: load_training_mask(s.mask_path, size, latent_size) for s in samples if s.mask_path}
