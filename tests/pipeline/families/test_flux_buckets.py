"""FLUX.1 on aspect-ratio buckets (docs/design.md#aspect-ratio-buckets): the size multiple is the VAE's
downsampling times the 2x2 packing, and a non-square bucket trains with position ids of its own token grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.buckets import bucket_sizes, nearest_bucket
from pipeline.families import load_base_pipeline
from pipeline.families.flux import FLUX, image_ids
from pipeline.models.base_model import BaseModelSpec
from pipeline.models.presets import get_preset
from pipeline.train import TrainConfig, TrainingSample, train_lora
from pipeline.train.data import INSTANCE, SEGMIX
from tests.pipeline.train.conftest import write_image, write_mask

RES = 64


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    preset = get_preset("tiny-flux")
    spec = BaseModelSpec(source=preset.base_model, family=preset.family)
    return load_base_pipeline(spec, tmp_path_factory.mktemp("flux_bucket_models"))


def test_flux_trains_on_a_non_square_bucket(pipe, tmp_path):
    multiple = FLUX.size_multiple(pipe)
    assert multiple == 2 * FLUX.downsampling_factor(pipe) == 16
    samples = []
    for name, kind, size in [("wide", INSTANCE, (128, 64)), ("wide_mix", SEGMIX, (120, 64))]:
        path = tmp_path / f"{name}.png"
        sha = write_image(path, (200, 40, 40), size=size, stripes=True)
        mask = write_mask(tmp_path / f"{name}_mask.png", size=size) if kind == SEGMIX else None
        samples.append(TrainingSample(sha, str(path), f"a photo of {name}", kind, mask))
    bucket = nearest_bucket(128, 64, bucket_sizes("aspect", RES, multiple))
    assert bucket.width > bucket.height and bucket.width % 16 == 0 and bucket.height % 16 == 0
    rows, columns = bucket.height // 16, bucket.width // 16  # packed tokens: latent cells / 2 per side

    captured = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append((kwargs["hidden_states"].shape, kwargs["img_ids"].clone())),
        with_kwargs=True,
    )
    config = TrainConfig(
        steps=2, resolution=RES, rank=4, alpha=8, lr=1e-2, prior_weight=0, segmix_p=0.5, masked_loss=True,
        mixed_precision="no", buckets="aspect",
    )  # fmt: skip
    try:
        result = train_lora(pipe, samples, config, tmp_path / "out", tmp_path / "cache")
    finally:
        hook.remove()
    assert result.steps_done == 2 and all(np.isfinite(loss) for _, loss, _ in result.losses)
    assert result.metrics["buckets"] == 1 and result.metrics["latent_misses"] == 2
    assert captured
    for shape, ids in captured:
        assert tuple(shape[1:]) == (rows * columns, 64)  # 16 channels x 2x2 patch
        assert tuple(ids.shape) == (rows * columns, 3)
        torch.testing.assert_close(ids, image_ids(2 * rows, 2 * columns, ids.device, ids.dtype))
        assert int(ids[:, 1].max()) == rows - 1 and int(ids[:, 2].max()) == columns - 1
