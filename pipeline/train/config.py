"""Training settings for the DreamBooth-LoRA loop, and the fingerprint that ties a checkpoint to them.

``TrainConfig`` is the one declaration of the training settings: the launchpad's ``lora`` config is derived
from its fields and docstrings (``assets/launchpad.py``), and ``resolve_train_config`` fills what a run leaves
unset (None) from the model preset and the base model's precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipeline.buckets import parse_aspects
from pipeline.errors import CastloraError
from pipeline.families.flow_matching import WEIGHTING_SCHEMES
from pipeline.lora.adapters import UNET_TARGETS
from pipeline.settings import family_option, family_option_fields, from_preset, internal, resolve, unresolved
from pipeline.train.data import SEGMIX_DRAWS

LR_SCHEDULERS = ("constant", "cosine")
MASK_NORMALIZATIONS = ("mean", "mask_mean")
MIXED_PRECISIONS = ("no", "fp16", "bf16")

# Fields that do not change what is trained (compiling changes float rounding at most): they may differ
# between a run and its resume.
_RESULT_NEUTRAL = frozenset(
    {"checkpoint_every", "keep_checkpoints", "log_every", "gradient_checkpointing", "compile_unet"}
)
# Fields added later: left out of the fingerprint while off, so checkpoints written before they existed still resume.
_OMITTED_WHEN_ZERO = ("kl_weight", "dpo_beta")
_OMITTED_AT = {"gradient_accumulation_steps": 1, "buckets": "square"}
# Fields that did not exist when older LoRA records were written, with what those runs did (square crops only).
_RECORDED_BEFORE = {"buckets": "square"}
# Family options (FLUX's σ sampling and training guidance) are left out of the fingerprint at their defaults too
# (``result_fields``), so SDXL runs and FLUX runs from before they were settings resume.


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = from_preset("train_steps")
    """Optimizer steps; not set: the model preset's ``train_steps``."""
    batch_size: int = 1
    """Instance images per step and process; with prior preservation each step also sees as many prior images."""
    lr: float = 1e-4
    """Learning rate of the denoiser's LoRA (SDXL: U-Net, FLUX.1: transformer; AdamW)."""
    lr_scheduler: str = "constant"
    """``constant`` or ``cosine`` (decays to 0 over ``steps``)."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up at the start of the schedule."""
    rank: int = 32
    """LoRA rank (MuDI: 32)."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / rank."""
    targets: tuple[str, ...] = internal(UNET_TARGETS)
    """U-Net attention projections that get LoRA layers."""
    train_text_encoder: bool = False
    """Also train LoRA on the text encoders (SDXL: both CLIP encoders; FLUX.1: CLIP only, T5 stays frozen); text
    embeddings are then computed every step, not cached."""
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA; None = ``lr``."""
    segmix_p: float = 0.3
    """Probability that an instance (and prior) slot is a Seg-Mix composite rather than a single photo."""
    segmix_draw: str = "shared"
    """``shared`` (MuDI): one Seg-Mix draw decides for an instance slot and its prior slot together;
    ``independent``: each image draws on its own (castlora before this option)."""
    prior_weight: float = 1.0
    """Weight of the prior-preservation loss; 0 disables prior preservation."""
    dco_beta: float = 0.0
    """>0 replaces the instance MSE by the DCO loss against the same denoiser with LoRA scale 0 (MuDI uses 1000;
    FLUX.1: its flow-matching form)."""
    kl_weight: float = internal(0.0)
    """>0 adds ``kl_weight`` × the KL towards the starting LoRA (``init_lora``, the previous round's model) to the
    instance loss: MuDI's iterative training (docs/design.md#losses, weight ≈ 1.0). Needs ``init_lora``."""
    dpo_beta: float = internal(0.0)
    """Diffusion-DPO's β, used only by ``train_preference`` (which requires it > 0). It multiplies errors that are
    per-element means, as in Wallace et al.'s code: hence values in the thousands (paper, SD1.5: 5000; SDXL is
    often run at 2500; diffusers' SDXL research example defaults to 5000)."""
    masked_loss: bool = False
    """Weight the instance loss by the subjects' union mask (background pixels do not count)."""
    mask_normalization: str = "mean"
    """``mean``: mean of mask * error over all pixels; ``mask_mean``: that divided by the mask's mean."""
    resolution: int | None = from_preset("resolution")
    """Training size: with ``buckets: square`` images are resized (shorter side) and centre-cropped to this square;
    with aspect buckets it sets their pixel count (about resolution²). A multiple of 8 (FLUX.1: of 16, for its
    2×2 packed latents). Not set: the model preset's ``resolution``."""
    buckets: str = "square"
    """Aspect-ratio buckets: ``square`` (one resolution x resolution bucket, every image centre-cropped to it);
    ``aspect`` (1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16 at about resolution² pixels, sides multiples of the model's
    latent x patch size); or a comma list of width:height ratios (``1:1,3:4,4:3``). Each photo and Seg-Mix
    composite goes to the bucket nearest its aspect, is resized to cover it and centre-cropped; each step trains
    on one bucket. Pair it with the Seg-Mix bank's ``canvas_aspects`` so composites come in the same aspects."""
    mixed_precision: str | None = None
    """``no``, ``fp16`` or ``bf16``: frozen weights in fp16/bf16 on GPU with autocast; LoRA parameters always stay
    fp32. Not set: the precision the base model is loaded in (the models resource's dtype: fp16 on CUDA, no on
    CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less GPU memory, slower steps."""
    compile_unet: bool = False
    """``torch.compile`` the denoiser's training forward/backward (inductor; SDXL U-Net or FLUX.1 transformer).
    Faster steps (tiny SDXL on CPU: 1.8x / 1.55x / 1.1x over eager at 128 / 256 / 512 px, benchmarks/README.md)
    after a one-off compile on the first step: minutes on a small CPU, seconds once inductor's on-disk cache holds
    it. For long runs; on CPU it needs a C++ compiler and raises peak RSS by ~100-200 MiB."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA only): less optimizer memory."""
    adam_weight_decay: float = 1e-4
    """AdamW's decoupled weight decay on the LoRA parameters (diffusers' DreamBooth scripts and MuDI: 1e-4)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches of ``batch_size`` per optimizer step: the effective batch is their product (× processes).
    MuDI trains batch 1 × accumulation 2; ``steps`` counts optimizer steps, so accumulation k costs k times the
    forward/backward passes of the same ``steps``."""
    seed: int = 0
    """Seeds the LoRA initialisation, the data order, Seg-Mix draws and the noise."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    log_every: int = 10
    """Report the loss every this many steps."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    sigma_sampling: str = family_option("uniform")
    """FLUX.1 only (flow matching): how training draws the noise level σ. ``uniform`` (the diffusers
    reference script's default), ``logit_normal`` (σ = sigmoid(N(logit_mean, logit_std)): more steps at mid noise,
    as SD3/FLUX pre-training) or ``mode`` (``mode_scale``). Another family refuses anything but ``uniform``."""
    logit_mean: float = family_option(0.0)
    """Mean of the normal behind ``sigma_sampling=logit_normal`` (FLUX.1 only)."""
    logit_std: float = family_option(1.0)
    """Standard deviation of the normal behind ``sigma_sampling=logit_normal`` (FLUX.1 only)."""
    mode_scale: float = family_option(1.29)
    """Scale of ``sigma_sampling=mode`` (FLUX.1 only; SD3's 1.29; 0 is uniform)."""
    training_guidance: float = family_option(1.0)
    """FLUX.1 only: the distilled-guidance value a guidance-distilled model (FLUX.1-dev) is trained with (the
    reference script's ``--guidance_scale``, 1.0). A model without a guidance embedding (FLUX.1-schnell) refuses
    anything but 1.0."""

    def __post_init__(self) -> None:
        problems = []
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1 (leave it unset for the model preset's train_steps)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.gradient_accumulation_steps < 1:
            problems.append(f"gradient_accumulation_steps={self.gradient_accumulation_steps} must be >= 1")
        if self.adam_weight_decay < 0:
            problems.append(f"adam_weight_decay={self.adam_weight_decay} must be >= 0")
        if self.segmix_draw not in SEGMIX_DRAWS:
            problems.append(f"segmix_draw={self.segmix_draw!r} must be one of {SEGMIX_DRAWS}")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler={self.lr_scheduler!r} must be one of {LR_SCHEDULERS}")
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be >= 1")
        if not 0.0 <= self.segmix_p <= 1.0:
            problems.append(f"segmix_p={self.segmix_p} must be in [0, 1]")
        if min(self.prior_weight, self.dco_beta, self.kl_weight, self.dpo_beta) < 0:
            problems.append("prior_weight, dco_beta, kl_weight and dpo_beta must be >= 0")
        if self.mask_normalization not in MASK_NORMALIZATIONS:
            problems.append(f"mask_normalization={self.mask_normalization!r} must be one of {MASK_NORMALIZATIONS}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            problems.append(
                f"mixed_precision={self.mixed_precision!r} must be one of {MIXED_PRECISIONS} (leave it unset for the "
                "base model's precision)"
            )
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            problems.append(
                f"resolution={self.resolution} must be a positive multiple of 8 (leave it unset for the model "
                "preset's resolution)"
            )
        try:
            parse_aspects(self.buckets)
        except CastloraError as exc:
            problems.append(str(exc).rstrip("."))
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            problems.append("checkpoint_every, keep_checkpoints and log_every must be >= 1")
        if not self.targets:
            problems.append("targets must name at least one module")
        problems += self._sigma_problems()
        if problems:
            raise CastloraError("Invalid training config: " + "; ".join(problems) + ".")

    def _sigma_problems(self) -> list[str]:
        """σ-sampling settings that are invalid, or set for a scheme that does not read them."""
        problems = []
        if self.sigma_sampling not in WEIGHTING_SCHEMES:
            problems.append(f"sigma_sampling={self.sigma_sampling!r} must be one of {WEIGHTING_SCHEMES}")
        if self.logit_std <= 0:
            problems.append(f"logit_std={self.logit_std} must be > 0")
        if self.training_guidance < 0:
            problems.append(f"training_guidance={self.training_guidance} must be >= 0")
        if self.sigma_sampling != "logit_normal" and (self.logit_mean, self.logit_std) != (0.0, 1.0):
            problems.append(
                f"logit_mean/logit_std ({self.logit_mean}, {self.logit_std}) are read only with "
                f"sigma_sampling='logit_normal' (it is {self.sigma_sampling!r}): leave them at 0.0 and 1.0"
            )
        if self.sigma_sampling != "mode" and self.mode_scale != 1.29:
            problems.append(
                f"mode_scale={self.mode_scale} is read only with sigma_sampling='mode' (it is "
                f"{self.sigma_sampling!r}): leave it at 1.29"
            )
        return problems

    def as_record(self) -> dict[str, Any]:
        """Every field, JSON-ready: what a LoRA's record keeps so ``from_record`` rebuilds this config exactly."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Any, source: str) -> TrainConfig:
        """The config ``as_record`` wrote, exactly: a missing or unknown field is an error naming ``source``
        (the record it came from), never a silent default."""
        if not isinstance(record, dict):
            raise CastloraError(
                f"{source} records no training settings (written by an older castlora): re-materialize 'lora'."
            )
        names = {f.name for f in fields(cls)}
        # Fields added later whose one value before they existed is known: an older record trained with that value
        # (square crops only; family options at their defaults).
        earlier = {**_RECORDED_BEFORE, **{f.name: f.default for f in family_option_fields(cls)}}
        record = {**{k: v for k, v in earlier.items() if k not in record}, **record}
        missing = sorted(names - set(record))
        unknown = sorted(set(record) - names)
        if missing or unknown:
            problems = [f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else ""]
            raise CastloraError(
                f"{source}: the recorded training settings do not match this castlora's TrainConfig "
                f"({'; '.join(p for p in problems if p)}), so they cannot be rebuilt exactly: re-materialize the "
                "LoRA with this castlora."
            )
        # JSON has no tuples: sequence fields (``targets``) come back as lists.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for every field that differs."""
        mine, theirs = self.as_record(), other.as_record()
        return {k: (v, theirs[k]) for k, v in mine.items() if v != theirs[k]}

    @property
    def prior_preservation(self) -> bool:
        return self.prior_weight > 0

    def unresolved(self) -> list[str]:
        """Fields still None that training needs: ``resolve_train_config`` fills them."""
        return [*unresolved(self), *(["mixed_precision"] if self.mixed_precision is None else [])]

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights, JSON-ready (what a checkpoint fingerprint hashes).

        ``steps`` matters only through the cosine schedule: with a constant schedule a finished run can be
        extended by resuming with more steps. Every path that trains or versions a LoRA asks for these, so an
        unresolved config is refused here.
        """
        missing = self.unresolved()
        if missing:
            raise CastloraError(
                f"TrainConfig fields {missing} are not set: resolve_train_config(config, preset, base_dtype) fills "
                "them before training."
            )
        fields = {k: v for k, v in asdict(self).items() if k not in _RESULT_NEUTRAL}
        fields["targets"] = list(self.targets)
        if self.lr_scheduler == "constant":
            fields.pop("steps")
        for name in _OMITTED_WHEN_ZERO:
            if not fields[name]:
                fields.pop(name)
        for name, value in _OMITTED_AT.items():
            if fields[name] == value:
                fields.pop(name)
        for option in family_option_fields(self):
            if fields[option.name] == option.default:
                fields.pop(option.name)
        if self.segmix_p == 0 or not self.prior_preservation:
            fields.pop("segmix_draw")  # nothing to share: the draw cannot change the weights
        return fields

    def identity_fields(self, preference: bool = False) -> dict[str, Any]:
        """``result_fields`` less what the objective ignores: the LoRA version and checkpoint fingerprint.

        ``dpo_beta`` acts only in ``train_preference``; in plain training it changes nothing, so it must not
        make a new version (or refuse a resume).
        """
        fields = self.result_fields()
        if not preference:
            fields.pop("dpo_beta", None)
        return fields


AUTOCAST = {"float16": "fp16", "bfloat16": "bf16"}
"""Base-model dtype → the mixed precision that trains in it; any other dtype (float32) trains without autocast."""


def resolve_train_config(config: TrainConfig, preset: Any, base_dtype: str) -> TrainConfig:
    """``config`` with every unset field filled: ``steps`` and ``resolution`` from the model preset,
    ``mixed_precision`` from ``base_dtype`` (the torch dtype name the frozen base model is loaded in)."""
    resolved = resolve(config, preset)
    if resolved.mixed_precision is None:
        resolved = replace(resolved, mixed_precision=AUTOCAST.get(base_dtype, "no"))
    return resolved
