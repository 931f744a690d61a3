"""MuDI's mean-shifted initialization and generation on the tiny SDXL pipeline (CPU, 64 px, 2 steps)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.families import family_for
from pipeline.infer import (
    DEFAULT_NEGATIVE,
    DEFAULT_SCENE_PROMPTS,
    Layout,
    MudiInit,
    SampleRequest,
    encode_layout,
    generate,
    layout_from_boxes,
    mudi_initial_latents,
    scene_prompts,
)
from pipeline.layout_control import PairLayouts, parse_prompt_entries, pixel_box
from pipeline.models.latents import from_model_latents, to_model_latents
from pipeline.models.tiny_sdxl import build_tiny_sdxl
from pipeline.segmix.compose import SegMixSubject
from pipeline.storage.hashing import sha256_file
from pipeline.train.caches import build_latent_cache
from pipeline.train.data import INSTANCE, TrainingSample

SIDE = 64
STEPS = 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl(folder)
    return folder


def load(model_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> StableDiffusionXLPipeline:
    return load(model_dir)


@pytest.fixture(scope="module")
def lora_pipe(model_dir: Path) -> StableDiffusionXLPipeline:
    """The same pipeline with a random (non-zero) PEFT LoRA on the U-Net attention."""
    loaded = load(model_dir)
    loaded.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in loaded.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return loaded


def block_layout(side: int = SIDE) -> Layout:
    """A saturated red block on the left and a blue one on the right, on white."""
    pixels = np.full((side, side, 3), 255, dtype=np.uint8)
    mask = np.zeros((side, side), dtype=bool)
    pixels[16:48, 4:28] = (230, 20, 20)
    pixels[8:56, 36:60] = (20, 30, 230)
    mask[16:48, 4:28] = True
    mask[8:56, 36:60] = True
    return Layout(Image.fromarray(pixels), mask, [(4, 16, 28, 48), (36, 8, 60, 56)], "user")


@contextmanager
def unet_inputs(pipe: StableDiffusionXLPipeline) -> Iterator[list[torch.Tensor]]:
    """Record the latent input (``sample``) of every U-Net call."""
    seen: list[torch.Tensor] = []
    original = pipe.unet.forward

    def spy(sample: torch.Tensor, *args, **kwargs):
        seen.append(sample.detach().clone())
        return original(sample, *args, **kwargs)

    pipe.unet.forward = spy
    try:
        yield seen
    finally:
        del pipe.unet.forward  # back to the class's forward


def first_unet_input(pipe: StableDiffusionXLPipeline, seed: int, latents: torch.Tensor | None) -> torch.Tensor:
    with unet_inputs(pipe) as seen:
        pipe(
            prompt="olis dog and vrin dog",
            height=SIDE,
            width=SIDE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            latents=latents,
            output_type="latent",
        )
    return seen[0]


def expected_first_input(pipe: StableDiffusionXLPipeline, start: torch.Tensor) -> torch.Tensor:
    """What the U-Net must see at step 0 if the pipeline scales ``start`` by init_noise_sigma once."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return scheduler.scale_model_input(start * scheduler.init_noise_sigma, scheduler.timesteps[0])


def init_noise_sigma(pipe: StableDiffusionXLPipeline) -> float:
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return float(scheduler.init_noise_sigma)


def mudi_latents(pipe: StableDiffusionXLPipeline, seed: int, gamma: float) -> torch.Tensor:
    layout = block_layout()
    z, mask = encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE)
    return mudi_initial_latents(pipe, z, mask, gamma, torch.Generator().manual_seed(seed))


def test_init_noise_sigma_is_applied_exactly_once(pipe: StableDiffusionXLPipeline) -> None:
    latents = mudi_latents(pipe, seed=3, gamma=1.0)
    seen = first_unet_input(pipe, seed=3, latents=latents.clone())
    sigma = init_noise_sigma(pipe)
    once = expected_first_input(pipe, latents)
    twice = expected_first_input(pipe, latents * sigma)

    # Euler with "leading" spacing: ~14.6 at SDXL's 30+ steps, ~1.9 at 2 steps; either way a second
    # application is far outside the tolerances below.
    assert sigma > 1.5
    assert seen.shape == (2, 4, SIDE // 8, SIDE // 8)  # classifier-free guidance doubles the batch
    for half in seen:  # unconditional and conditional halves get the same latents
        torch.testing.assert_close(half, once[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(half, twice[0], rtol=1e-2, atol=1e-2)

    # The mistake itself: pre-multiplying by init_noise_sigma makes the U-Net see the double-scaled value.
    premultiplied = first_unet_input(pipe, seed=3, latents=latents * sigma)
    torch.testing.assert_close(premultiplied[0], twice[0], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(premultiplied[0], once[0], rtol=1e-2, atol=1e-2)


def test_gamma_zero_is_the_pipelines_own_noise_exactly(pipe: StableDiffusionXLPipeline) -> None:
    plain = first_unet_input(pipe, seed=11, latents=None)
    ours = first_unet_input(pipe, seed=11, latents=mudi_latents(pipe, seed=11, gamma=0.0))
    assert torch.equal(plain, ours)

    layout = block_layout()
    requests = [SampleRequest("olis dog", 11, gamma=0.0), SampleRequest("olis dog", 11, gamma=None)]
    images = [np.asarray(image) for _, image in generate(pipe, requests, layout, SIDE, SIDE, STEPS, GUIDANCE)]
    np.testing.assert_array_equal(images[0], images[1])


def test_noise_matches_randn_tensor_and_layout_term_is_masked(pipe: StableDiffusionXLPipeline) -> None:
    layout = block_layout()
    z, mask = encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE)
    gamma = 2.5
    latents = mudi_initial_latents(pipe, z, mask, gamma, torch.Generator().manual_seed(5), batch_size=2)
    noise = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)

    shift = latents - noise
    outside = (mask == 0).expand_as(shift)
    assert torch.equal(shift[outside], torch.zeros_like(shift[outside]))  # M ⊙ z: nothing outside the mask
    torch.testing.assert_close(shift, (gamma * mask * z).expand_as(shift), rtol=1e-5, atol=1e-6)
    assert shift[~outside].abs().min() > 0  # the layout really is inside the mask
    assert not torch.equal(latents[0], latents[1])  # each batch item has its own noise


def test_gamma_changes_the_start_and_the_image(pipe: StableDiffusionXLPipeline) -> None:
    plain = first_unet_input(pipe, seed=4, latents=mudi_latents(pipe, seed=4, gamma=0.0))
    shifted = first_unet_input(pipe, seed=4, latents=mudi_latents(pipe, seed=4, gamma=1.0))
    mask = encode_layout(pipe, block_layout().image, block_layout().union_mask, SIDE, SIDE)[1]
    outside = (mask == 0).expand_as(plain)
    assert torch.equal(plain[outside], shifted[outside])
    assert not torch.equal(plain[~outside], shifted[~outside])

    requests = [SampleRequest("olis dog", 4, gamma=None), SampleRequest("olis dog", 4, gamma=30.0)]
    images = [np.asarray(image, dtype=int) for _, image in generate(pipe, requests, block_layout(), SIDE, SIDE, 2, 5.0)]
    assert np.abs(images[0] - images[1]).max() > 0


def test_encode_layout_shapes_values_and_mask_resize(pipe: StableDiffusionXLPipeline) -> None:
    height, width = 48, 64
    composite = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), dtype=bool)
    mask[:, :64] = True  # left half -> latent columns 0..3
    mask[0:12, 64:112] = True  # 12 of 16 composite rows of latent row 0, cols 4..6 -> 3/4 covered -> subject
    mask[48:52, 64:128] = True  # 4 of 16 rows of latent row 3 -> 1/4 covered -> background
    z, latent_mask = encode_layout(pipe, composite, mask, height, width)

    assert z.shape == (1, 4, height // 8, width // 8)
    assert latent_mask.shape == (1, 1, height // 8, width // 8)
    expected = np.zeros((6, 8), dtype=np.float32)
    expected[:, :4] = 1
    expected[0, 4:7] = 1
    np.testing.assert_array_equal(latent_mask[0, 0].numpy(), expected)

    # Independent preprocessing (diffusers' own image processor) gives the same latent.
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(composite.resize((width, height), Image.Resampling.BICUBIC))
        reference = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(z, reference, rtol=1e-4, atol=1e-5)


def test_encode_layout_refuses_bad_inputs(pipe: StableDiffusionXLPipeline) -> None:
    layout = block_layout()
    with pytest.raises(CastloraError, match="union mask shape"):
        encode_layout(pipe, layout.image, layout.union_mask[:32], SIDE, SIDE)
    with pytest.raises(CastloraError, match="multiples"):
        encode_layout(pipe, layout.image, layout.union_mask, 60, SIDE)
    with pytest.raises(CastloraError, match="gamma"):
        MudiInit(gamma=-1.0)
    with pytest.raises(CastloraError, match="no layout"):
        list(generate(pipe, [SampleRequest("x", 1, gamma=1.0)], None, SIDE, SIDE, STEPS, GUIDANCE))


def test_generate_depends_only_on_each_requests_seed(pipe: StableDiffusionXLPipeline) -> None:
    layout = block_layout()
    a = SampleRequest("olis dog and vrin dog in a park", 21, gamma=1.0)
    b = SampleRequest("olis dog and vrin dog in a park", 22, gamma=1.0, negative_prompt=DEFAULT_NEGATIVE)
    forward = {r.seed: np.asarray(image) for r, image in generate(pipe, [a, b], layout, SIDE, SIDE, STEPS, GUIDANCE)}
    backward = {r.seed: np.asarray(image) for r, image in generate(pipe, [b, a], layout, SIDE, SIDE, STEPS, GUIDANCE)}
    alone = dict((r.seed, np.asarray(image)) for r, image in generate(pipe, [a], layout, SIDE, SIDE, STEPS, GUIDANCE))
    np.testing.assert_array_equal(forward[21], backward[21])
    np.testing.assert_array_equal(forward[22], backward[22])
    np.testing.assert_array_equal(forward[21], alone[21])
    assert not np.array_equal(forward[21], forward[22])


def test_lora_scale_reaches_the_unet(pipe: StableDiffusionXLPipeline, lora_pipe: StableDiffusionXLPipeline) -> None:
    requests = [SampleRequest("olis dog", 8, lora_scale=0.0), SampleRequest("olis dog", 8, lora_scale=1.0)]
    off, on = (np.asarray(image, dtype=int) for _, image in generate(lora_pipe, requests, None, SIDE, SIDE, 2, 5.0))
    ((_, base),) = generate(pipe, [SampleRequest("olis dog", 8)], None, SIDE, SIDE, STEPS, GUIDANCE)
    # Scale 0 is the base model up to rounding: the LoRA-wrapped layers take other kernel paths (oneDNN/BLAS pick
    # blockings per module), so one 8-bit level may flip on some pixels depending on the CPU and library build.
    base_diff = np.abs(off - np.asarray(base, dtype=int))
    assert base_diff.max() <= 1 and (base_diff > 0).mean() < 0.001, (base_diff.max(), (base_diff > 0).mean())
    assert np.abs(on - off).max() > 8  # scale 1 really changes the image, far beyond that rounding


def test_layout_from_boxes_places_cutouts_in_their_boxes() -> None:
    def disc(colour: tuple[int, int, int], size: int, pad: int) -> Image.Image:
        yy, xx = np.mgrid[0 : size + 2 * pad, 0 : size + 2 * pad]
        centre = pad + size / 2
        inside = (xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2 <= (size / 2) ** 2
        rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
        rgba[inside] = (*colour, 255)
        return Image.fromarray(rgba)

    small_box, big_box = (4, 40, 24, 60), (30, 4, 90, 64)
    layout = layout_from_boxes(
        [disc((250, 0, 0), 20, pad=15), disc((0, 0, 250), 50, pad=3)], [small_box, big_box], canvas=(96, 72)
    )
    assert layout.image.size == (96, 72) and layout.union_mask.shape == (72, 96) and layout.source == "user"
    pixels = np.asarray(layout.image).astype(int)
    in_box = np.zeros((72, 96), dtype=bool)
    for x0, y0, x1, y1 in (small_box, big_box):
        in_box[y0:y1, x0:x1] = True
    assert not layout.union_mask[~in_box].any()  # nothing outside the boxes
    assert (pixels[~layout.union_mask] == 255).all()  # white background elsewhere
    red = layout.union_mask[40:60, 4:24].sum()
    blue = layout.union_mask[4:64, 30:90].sum()
    assert 8 < blue / red < 10  # padding cropped, discs fill their boxes: sides 20 vs 60 -> areas 1:9
    for (x0, y0, x1, y1), (bx0, by0, bx1, by1) in zip(layout.boxes, (small_box, big_box), strict=True):
        assert bx0 <= x0 < x1 <= bx1 and by0 <= y0 < y1 <= by1

    with pytest.raises(CastloraError, match="box 0"):
        layout_from_boxes([disc((1, 2, 3), 10, 0)], [(0, 0, 200, 10)], canvas=(96, 72))
    with pytest.raises(CastloraError, match="transparent"):
        layout_from_boxes([Image.new("RGBA", (8, 8))], [(0, 0, 8, 8)], canvas=(96, 72))


def test_scene_prompts_fill_the_subjects() -> None:
    prompts = scene_prompts(["olis dog", "vrin dog"])
    assert len(prompts) == len(DEFAULT_SCENE_PROMPTS) >= 6
    assert all("olis dog and vrin dog" in p and "{" not in p for p in prompts)
    with pytest.raises(CastloraError, match="subjects"):
        scene_prompts(["a"], ["no placeholder"])


def test_float16_vae_is_upcast_for_encoding_and_restored(model_dir: Path, pipe: StableDiffusionXLPipeline) -> None:
    half = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float16)
    assert half.vae.config.force_upcast
    input_dtypes: list[torch.dtype] = []
    original_encode = half.vae.encode

    def spy(x: torch.Tensor, *args, **kwargs):
        input_dtypes.append(x.dtype)
        return original_encode(x, *args, **kwargs)

    half.vae.encode = spy
    layout = block_layout()
    z, mask = encode_layout(half, layout.image, layout.union_mask, SIDE, SIDE)
    assert input_dtypes == [torch.float32] and half.vae.dtype == torch.float16  # upcast for the call only
    reference, _ = encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE)
    torch.testing.assert_close(z, reference, rtol=0, atol=2e-3)  # fp16-rounded weights, fp32 arithmetic

    latents = mudi_initial_latents(half, z, mask, 1.0, torch.Generator().manual_seed(2))
    assert latents.dtype == torch.float16  # the dtype prepare_latents would draw in


def test_training_cache_and_inference_share_one_latent_normalisation(model_dir: Path, tmp_path: Path) -> None:
    """A VAE config with latents_mean/std and shift_factor: the training cache, MuDI's init and the pipeline's
    decode all use the same map (before, the cache ignored mean/std and inference ignored the shift)."""
    normalised = load(model_dir)
    normalised.vae.register_to_config(
        latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.9, 1.1, 0.8, 1.2], shift_factor=0.07
    )
    layout = block_layout()
    path = tmp_path / "layout.png"
    layout.image.save(path)
    sample = TrainingSample(sha256_file(path), str(path), "x", INSTANCE)
    cached, _ = build_latent_cache(normalised.vae, [sample], SIDE, tmp_path / "cache")
    z, _ = encode_layout(normalised, layout.image, layout.union_mask, SIDE, SIDE)
    torch.testing.assert_close(cached[sample.sample_id].latent, z[0], rtol=1e-5, atol=1e-6)

    pixels = torch.from_numpy(np.asarray(layout.image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        raw = normalised.vae.encode(pixels).latent_dist.mean
    config = normalised.vae.config
    mean, std = torch.tensor(config.latents_mean).view(1, 4, 1, 1), torch.tensor(config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(z, (raw - mean) * config.scaling_factor / std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_model_latents(config, to_model_latents(config, raw)), raw, rtol=1e-5, atol=1e-6)

    # The pipeline decodes the final latents with exactly from_model_latents.
    final: list[torch.Tensor] = []
    decoded: list[torch.Tensor] = []
    original_decode = normalised.vae.decode

    def spy(latents: torch.Tensor, *args, **kwargs):
        decoded.append(latents.detach().clone())
        return original_decode(latents, *args, **kwargs)

    def keep_latents(pipeline, step, timestep, callback_kwargs):
        final[:] = [callback_kwargs["latents"].detach().clone()]
        return callback_kwargs

    normalised.vae.decode = spy
    normalised("x", height=SIDE, width=SIDE, num_inference_steps=1, callback_on_step_end=keep_latents)
    torch.testing.assert_close(decoded[0], from_model_latents(config, final[0]), rtol=1e-5, atol=1e-6)


def test_user_boxes_put_the_inits_latent_mask_inside_the_boxes(pipe: StableDiffusionXLPipeline) -> None:
    """Layout control (docs/design.md#layout-control): the layout term of the init lands only in the given boxes."""

    def solid(colour: tuple[int, int, int], width: int, height: int) -> Image.Image:
        return Image.fromarray(np.full((height, width, 4), (*colour, 255), dtype=np.uint8))

    subjects = {
        "dog6": [SegMixSubject(solid((230, 20, 20), 30, 40), "olis dog", "dog6")],
        "dog2": [SegMixSubject(solid((20, 30, 230), 40, 30), "vrin dog", "dog2")],
    }
    boxes = {"dog6": [0.0, 0.25, 0.5, 1.0], "dog2": [0.5, 0.0, 1.0, 0.5]}
    entry = parse_prompt_entries([{"prompt": "p", "layout": {"mode": "boxes", "boxes": boxes}}], ["dog6", "dog2"])[0]
    layout = PairLayouts(subjects, (SIDE, SIDE)).factory(entry.layout)(0)
    _, mask = encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE)
    factor = family_for(pipe).downsampling_factor(pipe)
    allowed = torch.zeros_like(mask, dtype=torch.bool)
    for cid, box in boxes.items():
        x0, y0, x1, y1 = (v // factor for v in pixel_box(tuple(box), (SIDE, SIDE)))
        cells = mask[0, 0, y0:y1, x0:x1]
        assert cells.sum() >= 0.5 * cells.numel(), cid  # each character fills much of its own box
        allowed[0, 0, y0:y1, x0:x1] = True
    assert mask.sum() > 0 and not (mask.bool() & ~allowed).any()
    # And the init's shift is zero outside the boxes: ε + γ·M⊙z differs from ε only inside them.
    generator = torch.Generator().manual_seed(3)
    shifted = mudi_initial_latents(
        pipe, *encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE), 1.0, generator
    )
    plain = mudi_initial_latents(
        pipe, *encode_layout(pipe, layout.image, layout.union_mask, SIDE, SIDE), 0.0, torch.Generator().manual_seed(3)
    )
    changed = (shifted != plain).any(dim=1, keepdim=True)
    assert changed.any() and not (changed & ~allowed).any()
