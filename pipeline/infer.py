"""Generation with MuDI's mean-shifted initialization (MuDI Algorithm 2, Eq. 3; docs/design.md#mudi-initialisation).

The denoising loop starts from ``z_T = ε + γ · M ⊙ z`` instead of plain noise ``ε``: ``z`` is the VAE latent of a
layout image (a Seg-Mix composite of the characters' cut-outs, or a user-given arrangement) and ``M`` its union
mask at latent size, so the model starts from a coarse picture of who stands where and is less likely to drop or
merge a character.

Everything that depends on the base model comes from its family (docs/design.md#model-families): the latent
grid (channels, downsampling factor, dtype), the pixel → latent map shared with training, and the pipeline call
that takes the initial latent. Two details decide whether this matches the paper and diffusers:

- diffusers multiplies latents passed through ``latents=`` by ``scheduler.init_noise_sigma`` (about 14.6 for
  SDXL's Euler scheduler, 1.0 for DDIM). The latents built here are therefore **unscaled**; scaling them here as
  well would apply the factor twice.
- ``ε`` is drawn with ``diffusers.utils.torch_utils.randn_tensor`` with the pipeline's own shape, dtype, device
  and generator, exactly as ``prepare_latents`` would draw it, so γ = 0 reproduces the pipeline's plain-noise
  image for the same seed bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.families import RenderRequest, family_for
from pipeline.images import to_rgb
from pipeline.segmix.compose import join_phrases

DEFAULT_NEGATIVE = "sticker, collage"
"""MuDI's negative prompt against Seg-Mix sticker artefacts (an option: the paper found heavier ones oversaturate)."""

SUBJECTS_FIELD = "{subjects}"

DEFAULT_SCENE_PROMPTS: tuple[str, ...] = (
    "A photo of {subjects} playing together in a park",
    "A photo of {subjects} sitting side by side on a sofa",
    "A photo of {subjects} on a sandy beach at sunset",
    "A photo of {subjects} in the snow",
    "A photo of {subjects} on a wooden table in a cozy kitchen",
    "A photo of {subjects} in a field of flowers",
    "A photo of {subjects} on a city street at night",
    "A photo of {subjects} in a forest, soft morning light",
)
"""Scene templates for a pair's default prompts; ``{subjects}`` becomes "olis dog and vrin dog"."""


def scene_prompts(phrases: Sequence[str], templates: Sequence[str] = DEFAULT_SCENE_PROMPTS) -> list[str]:
    """Fill each template's ``{subjects}`` with the characters' token phrases ("a and b", "a, b and c")."""
    subjects = join_phrases(phrases)
    missing = [t for t in templates if SUBJECTS_FIELD not in t]
    if missing:
        raise CastloraError(f"Scene prompt templates must contain {SUBJECTS_FIELD}; these do not: {missing}.")
    # str.replace, not str.format: a template may contain other braces.
    return [template.replace(SUBJECTS_FIELD, subjects) for template in templates]


@dataclass(frozen=True)
class MudiInit:
    gamma: float = 1.0
    """Weight of the encoded layout in the initial latent (paper ablates; 0 = plain noise)."""

    def __post_init__(self) -> None:
        check_gamma(self.gamma, "MudiInit.gamma")


def check_gamma(gamma: float, what: str) -> None:
    if not np.isfinite(gamma) or gamma < 0:
        raise CastloraError(f"{what} must be a finite number >= 0 (0 = plain noise, paper default 1.0); got {gamma}.")


@dataclass(frozen=True, eq=False)
class Layout:
    """Where the characters stand in the initial latent: an RGB image, its union mask and the subjects' boxes."""

    image: Image.Image
    union_mask: np.ndarray
    """Bool (H, W), same size as ``image``: True where a subject is."""
    boxes: list = field(default_factory=list)
    """(x0, y0, x1, y1) per subject, in ``image`` pixels (x1, y1 exclusive)."""
    source: str = "user"
    """``"segmix:<seed>"`` for a Seg-Mix composite, ``"user"`` for a user-given arrangement."""
    labels: tuple[str, ...] = ()
    """Character id per box, in ``boxes`` order (empty when unknown)."""
    origin: str = "user"
    """Who chose the arrangement: ``"user"`` (boxes or sizes), ``"llm"`` or ``"auto"`` (random Seg-Mix);
    docs/design.md#layout-control."""
    warning: str = ""
    """Why this layout is not the one asked for (an LLM layout that fell back to ``auto``); empty otherwise."""

    def __post_init__(self) -> None:
        mask = np.asarray(self.union_mask)
        expected = (self.image.height, self.image.width)
        if mask.ndim != 2 or mask.shape != expected:
            raise CastloraError(
                f"Layout union_mask has shape {mask.shape} but its image is {self.image.width}x{self.image.height}: "
                f"the mask must be a 2-D array of shape {expected}."
            )


def layout_from_composite(composite: Any, labels: Sequence[str] = (), origin: str = "auto") -> Layout:
    """A Layout from a ``pipeline.segmix.compose.compose`` result (anything with image, union_mask, boxes, seed);
    ``labels``: the character id of each subject, in the composite's subject order."""
    return Layout(
        image=to_rgb(composite.image),
        union_mask=np.asarray(composite.union_mask, dtype=bool),
        boxes=[tuple(int(v) for v in box) for box in composite.boxes],
        source=f"segmix:{composite.seed}",
        labels=tuple(labels),
        origin=origin,
    )


def _fit_into_box(cutout: Image.Image, box: tuple[int, int, int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Cut-out cropped to its visible pixels, scaled (aspect kept) to fit ``box`` and centred in it."""
    x0, y0, x1, y1 = box
    alpha_box = cutout.getchannel("A").getbbox()
    if alpha_box is None:
        raise CastloraError("layout_from_boxes got a fully transparent cut-out: nothing to place in its box.")
    subject = cutout.crop(alpha_box)
    scale = min((x1 - x0) / subject.width, (y1 - y0) / subject.height)
    size = (max(1, round(subject.width * scale)), max(1, round(subject.height * scale)))
    resized = subject.resize(size, Image.Resampling.LANCZOS)
    offset = (x0 + (x1 - x0 - size[0]) // 2, y0 + (y1 - y0 - size[1]) // 2)
    return resized, offset


def layout_from_boxes(
    cutouts: Sequence[Image.Image],
    boxes: Sequence[tuple[int, int, int, int]],
    canvas: tuple[int, int],
    background: tuple[int, int, int] = (255, 255, 255),
    labels: Sequence[str] = (),
    origin: str = "user",
) -> Layout:
    """A user-given layout: each RGBA cut-out, cropped to its visible pixels, fitted (aspect kept, centred) into
    its box; later cut-outs cover earlier ones. Relative sizes follow from the boxes. ``canvas`` is (width,
    height); the Layout's boxes are where each subject actually landed, inside the given boxes."""
    if len(cutouts) != len(boxes) or not cutouts:
        raise CastloraError(
            f"layout_from_boxes needs one box per cut-out; got {len(cutouts)} cut-outs, {len(boxes)} boxes."
        )
    width, height = canvas
    if width <= 0 or height <= 0:
        raise CastloraError(f"layout_from_boxes: canvas must be a positive (width, height); got {canvas}.")
    image = Image.new("RGB", (width, height), tuple(background))
    union = np.zeros((height, width), dtype=bool)
    placed: list[tuple[int, int, int, int]] = []
    for index, (cutout, box) in enumerate(zip(cutouts, boxes, strict=True)):
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise CastloraError(
                f"layout_from_boxes: box {index} {tuple(box)} must satisfy 0 <= x0 < x1 <= {width} and "
                f"0 <= y0 < y1 <= {height} (x1, y1 exclusive, canvas {width}x{height})."
            )
        subject, (left, top) = _fit_into_box(cutout.convert("RGBA"), (x0, y0, x1, y1))
        # Hard edges (alpha > 128, MuDI's mask convention): the pasted pixels and the union mask agree exactly.
        visible = np.asarray(subject.getchannel("A")) > 128
        image.paste(subject.convert("RGB"), (left, top), mask=Image.fromarray(visible.astype(np.uint8) * 255))
        union[top : top + subject.height, left : left + subject.width] |= visible
        placed.append((left, top, left + subject.width, top + subject.height))
    return Layout(image=image, union_mask=union, boxes=placed, source=origin, labels=tuple(labels), origin=origin)


def _execution_device(pipe: Any) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu"))


def _check_size(pipe: Any, height: int, width: int) -> int:
    factor = family_for(pipe).downsampling_factor(pipe)
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise CastloraError(
            f"Image size {width}x{height} must be positive multiples of the VAE's downsampling factor {factor}."
        )
    return factor


@torch.no_grad()
def encode_layout(
    pipe: Any,
    composite_image: Image.Image,
    union_mask: np.ndarray,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent ``z`` (1, C, h, w) and mask ``M`` (1, 1, h, w) of a layout, at latent size h = height / f (f the
    family's downsampling factor, 8 for SDXL).

    ``z`` is the family's ``encode_pixels`` of ``x``, the composite resized to (width, height) in [-1, 1]: the
    same function the training latent cache uses (for SDXL ``vae.encode(x).latent_dist.mean`` normalised by
    ``pipeline.models.latents.to_model_latents``, the inverse of the pipeline's decode). The mean, not a sample,
    is used, so ``generator`` is accepted for API symmetry and not consumed: the encoding is deterministic and the
    only randomness of a sample is its ε. The VAE runs in float32 (SDXL's VAE overflows in float16) and is put
    back in its dtype afterwards.

    ``M``: the union mask's area fraction per latent cell (area interpolation), thresholded at 0.5, as float
    {0, 1}: a cell counts as subject when most of its f x f pixels are.
    """
    del generator  # see docstring: encoding uses the distribution's mean
    factor = _check_size(pipe, height, width)
    mask = np.asarray(union_mask)
    if mask.shape != (composite_image.height, composite_image.width):
        raise CastloraError(
            f"encode_layout: union mask shape {mask.shape} does not match the composite "
            f"({composite_image.height}, {composite_image.width}); pass the composite's own union mask."
        )
    device = _execution_device(pipe)
    rgb = to_rgb(composite_image).resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    latents = family_for(pipe).encode_pixels(pipe, pixels, device)

    mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    fraction = F.interpolate(mask_tensor, size=(height // factor, width // factor), mode="area")
    latent_mask = (fraction >= 0.5).to(device=latents.device, dtype=torch.float32)
    return latents, latent_mask


def mudi_initial_latents(
    pipe: Any,
    layout_latents: torch.Tensor,
    layout_mask: torch.Tensor,
    gamma: float,
    generator: torch.Generator | list[torch.Generator] | None,
    batch_size: int = 1,
) -> torch.Tensor:
    """UNSCALED ``ε + γ · M ⊙ z`` to pass as ``latents=``; the pipeline multiplies it by init_noise_sigma.

    ε comes from ``randn_tensor`` with the shape, dtype, device and generator the family's pipeline would use
    (SDXL's ``prepare_latents``), so ``gamma=0`` returns exactly the pipeline's own noise. The shift is computed
    in float32 and the sum cast to the pipeline's latent dtype.
    """
    check_gamma(gamma, "gamma")
    family = family_for(pipe)
    channels = family.latent_channels(pipe)
    if layout_latents.ndim != 4 or layout_latents.shape[1] != channels:
        raise CastloraError(
            f"Layout latents have shape {tuple(layout_latents.shape)}; the model expects (1, {channels}, h, w). "
            "Encode the layout with encode_layout for this pipeline."
        )
    shape = (batch_size, channels, layout_latents.shape[2], layout_latents.shape[3])
    dtype = family.latent_dtype(pipe)
    device = _execution_device(pipe)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if gamma == 0:
        return noise  # not noise + 0 * shift: a non-finite latent must not leak into "plain noise"
    shift = layout_mask.to(device=device, dtype=torch.float32) * layout_latents.to(device=device, dtype=torch.float32)
    return (noise.float() + gamma * shift).to(dtype)


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    seed: int
    negative_prompt: str | None = None
    lora_scale: float = 1.0
    gamma: float | None = None
    """None = plain noise (no MuDI init); a number = MuDI init with that γ (needs a layout)."""

    def __post_init__(self) -> None:
        if self.gamma is not None:
            check_gamma(self.gamma, f"gamma of the request with seed {self.seed}")


def generate(
    pipe: Any,
    requests: Sequence[SampleRequest],
    layout: Layout | None,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    options: Any = None,
) -> Iterator[tuple[SampleRequest, Image.Image]]:
    """Render each request, in order, yielding ``(request, image)``.

    Each image has its own generator seeded with ``request.seed`` and is rendered alone (batch 1), so it depends
    only on its own request, never on batch order or neighbours. The family's ``render`` runs its pipeline from
    the initial latent and applies the LoRA scale (SDXL: ``cross_attention_kwargs={"scale": s}``, which reaches
    the U-Net's and text encoders' PEFT layers). The layout is encoded once and shared by all requests that use
    MuDI init. ``options``: a settings dataclass whose family options (FLUX's ``true_cfg_scale``) configure the
    family (``ModelFamily.with_options``: a family that does not read one refuses it set).
    """
    _check_size(pipe, height, width)
    if steps < 1:
        raise CastloraError(f"steps must be >= 1; got {steps}.")
    needs_layout = [r.seed for r in requests if r.gamma is not None]
    if needs_layout and layout is None:
        raise CastloraError(
            f"Requests with seeds {needs_layout} ask for MuDI init (gamma set) but no layout was given: pass a "
            "Layout (Seg-Mix composite or layout_from_boxes) or set gamma=None for plain noise."
        )
    device = _execution_device(pipe)
    family = family_for(pipe).with_options(options)
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None
    for request in requests:
        generator = torch.Generator(device=device).manual_seed(request.seed)
        latents = None
        if request.gamma is not None:
            if encoded is None:
                encoded = encode_layout(pipe, layout.image, layout.union_mask, height, width)
            latents = mudi_initial_latents(pipe, encoded[0], encoded[1], request.gamma, generator)
        render = RenderRequest(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            lora_scale=float(request.lora_scale),
            initial_latents=latents,
        )
        yield request, family.render(pipe, render)
