"""The DreamBooth-LoRA training loop for SDXL (MuDI setting), resumable and DDP-ready under accelerate.

Order of work: plan samples → build content-keyed caches (latents, text embeddings) → move the encoders
off the accelerator → add LoRA → resume from the newest checkpoint if any → train, checkpointing every
``checkpoint_every`` steps. Every random draw of a step (which samples, noise, timesteps) comes from
generators seeded by (seed, step, rank), so an interrupted and resumed run follows the same path as an
uninterrupted one.

Continuing from an earlier LoRA (``init_lora``, e.g. the previous round of MuDI's iterative training) starts
the trainable adapter from those weights (U-Net, and both text encoders when it has a text-encoder LoRA); with
``kl_weight`` > 0 a second, frozen copy of them (the adapter named ``reference``) anchors the model: the earlier
model whole, its text encoders included. The reference adapters are removed again when ``train_lora`` ends.
"""

from __future__ import annotations

import gc
import hashlib
import os
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers

from pipeline.errors import CastloraError, CheckpointError
from pipeline.lora.adapters import (
    DEFAULT_ADAPTER,
    LoraSpec,
    activate_adapter,
    add_text_encoder_lora,
    add_unet_lora,
    lora_parameters,
    remove_adapter,
    text_encoder_lora_state_dict,
    unet_lora_state_dict,
)
from pipeline.storage.hashing import sha256_json
from pipeline.train.caches import (
    CachedLatent,
    CachedText,
    build_latent_cache,
    build_text_cache,
    encode_prompts,
    load_masks,
    module_identity,
)
from pipeline.train.checkpoint import (
    TrainingState,
    capture_rng,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from pipeline.train.config import TrainConfig
from pipeline.train.data import SamplePools, TrainingSample, plan_step, samples_fingerprint_items
from pipeline.train.init_lora import (
    activate_or_disable,
    check_init_lora_matches,
    load_text_encoder_lora,
    split_init_lora,
)

ADAPTER_NAME = DEFAULT_ADAPTER
REFERENCE_ADAPTER = "reference"
"""Frozen copy of ``init_lora`` on the same U-Net: the reference model of the KL term and of Diffusion-DPO."""
_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

LogCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    losses: list[tuple[int, float, float]]
    """(step, loss averaged over processes, learning rate) for every step, including those before a resume."""
    lora_state: dict[str, torch.Tensor]
    """U-Net LoRA from ``pipeline.lora.adapters.unet_lora_state_dict`` (diffusers naming, ``unet.`` prefix)."""
    resumed_from: int | None
    text_encoder_lora_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """``text_encoder`` / ``text_encoder_2`` -> ``text_encoder_lora_state_dict`` output, when ``train_text_encoder``."""
    metrics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- set-up


def _add_lora(model: torch.nn.Module, spec: LoraSpec, text_encoder: bool, seed: int) -> list[torch.nn.Parameter]:
    """A fresh fp32 LoRA adapter on ``model`` (replacing one left by an earlier run); returns its parameters.

    The RNG is forked so the initial A matrices depend only on ``seed``, not on what ran before.
    """
    remove_adapter(model, REFERENCE_ADAPTER)  # left behind by a run that died before cleaning up
    remove_adapter(model, ADAPTER_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if text_encoder:
            add_text_encoder_lora(model, spec, adapter_name=ADAPTER_NAME)
        else:
            add_unet_lora(model, spec, adapter_name=ADAPTER_NAME)
    return lora_parameters(model)


def lora_state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a LoRA state dict's names, shapes and fp32 values: ``init_lora``'s part of a fingerprint."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().float().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _diffusers_key(peft_key: str) -> str:
    """``unet_lora_state_dict``'s name for a PEFT key without adapter name (``….to_q.lora_A.weight``)."""
    (key,) = convert_state_dict_to_diffusers({peft_key: None}, original_type=StateDictType.PEFT)
    key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    return f"unet.{key}"


def load_unet_lora(unet: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy ``state`` (``unet_lora_state_dict`` format) into the U-Net adapter ``adapter_name``.

    The adapter was built from the training config, so a different rank (tensor shapes) or target set (names)
    is refused here. Alpha is not stored in the state dict: the caller must pass the round's own alpha.
    """
    suffix = f".{adapter_name}.weight"
    params = {
        _diffusers_key(name[: -len(suffix)] + ".weight"): param
        for name, param in unet.named_parameters()
        if name.endswith(suffix) and (".lora_A." in name or ".lora_B." in name)
    }
    check_init_lora_matches({k: tuple(p.shape) for k, p in params.items()}, state, "U-Net LoRA")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def _check_only_adapter_trains(model: torch.nn.Module, adapter_name: str) -> None:
    """PEFT's ``set_adapter`` flips ``requires_grad`` per adapter: after switching, exactly ours must train."""
    marker = f".{adapter_name}."
    wrong = [name for name, p in model.named_parameters() if p.requires_grad != ("lora_" in name and marker in name)]
    if wrong:
        raise CastloraError(f"Internal error: requires_grad is wrong after an adapter switch for {wrong[:3]}.")


def _set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Set explicitly either way, so a pipe reused across runs does not keep an earlier run's choice."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers models
        model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 naming
        model.activation_checkpointing_enable() if enabled else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()


def _trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor by ``<component>.<parameter name>``: what a checkpoint stores."""
    return {
        f"{component}.{name}": param.detach().cpu().clone()
        for component, model in models.items()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _load_trainable_state(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], folder: Path) -> None:
    params = {
        f"{component}.{name}": param
        for component, model in models.items()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(
            f"Checkpoint {folder}: LoRA tensors do not match the model (missing {missing[:3]}, unexpected "
            f"{extra[:3]}). Train into a new output folder or delete the checkpoints folder."
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies: the result must not change if the pipe trains again."""
    return {key: value.detach().float().cpu().clone() for key, value in state.items()}


def _make_optimizer(param_groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise CastloraError(
                "use_8bit_adam=True needs the 'bitsandbytes' package (pip install bitsandbytes, CUDA only); "
                "install it or set use_8bit_adam=False."
            ) from exc
        return bnb.optim.AdamW8bit(param_groups, lr=config.lr, weight_decay=config.adam_weight_decay)
    # One fused kernel over all LoRA tensors instead of a Python loop over hundreds of small ones: on the tiny
    # model's 272 LoRA tensors (CPU) 1.3 ms per step, vs 4.9 ms with foreach=True and 9.9 ms per tensor.
    return torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.adam_weight_decay, fused=True)


COMPILE_BACKEND = "inductor"
"""torch.compile backend for ``compile_unet``; tests use ``aot_eager`` (same graph capture, no C++ build)."""


def _compiled(module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    if COMPILE_BACKEND == "inductor" and device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "clang++") if shutil.which(c)), None)
        if not compiler or not shutil.which(compiler):
            raise CastloraError(
                "compile_unet=True on CPU needs a C++ compiler (inductor builds C++ kernels) and none was found "
                "(tried $CXX, g++, clang++): install g++ (apt install g++) or set compile_unet=False."
            )
    return torch.compile(module, backend=COMPILE_BACKEND)


def _make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _free_accelerator_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# ----------------------------------------------------------------------------------------------- loss


def per_sample_error(
    pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, normalization: str
) -> torch.Tensor:
    """Mean squared error per sample; with ``masks`` (N, 1, h, w), the masked error under ``normalization``."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, error.ndim))
    if masks is None:
        return error.mean(dim=dims)
    masked = (error * masks).mean(dim=dims)
    if normalization == "mask_mean":
        masked = masked / masks.expand_as(error).mean(dim=dims).clamp_min(1e-6)
    return masked


def dco_loss(model_error: torch.Tensor, reference_error: torch.Tensor, beta: float) -> torch.Tensor:
    """DCO: -log σ(-β (‖ε_θ − ε‖² − ‖ε_ref − ε‖²)), per sample then averaged; 0-gradient-free at init."""
    return -F.logsigmoid(-beta * (model_error - reference_error)).mean()


def kl_to_reference(pred: torch.Tensor, reference_pred: torch.Tensor) -> torch.Tensor:
    """MuDI's KL regulariser towards the previous round's model: mean over samples of the mean squared
    difference between the two models' predictions at the same noisy input.

    Each model's denoising posterior p(x_{t-1} | x_t) is a Gaussian with the same fixed variance σ_t² and a
    mean that is affine in the predicted noise, μ = (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t, so
    KL(p_θ ‖ p_ref) = ‖μ_θ − μ_ref‖² / (2σ_t²) ∝ ‖ε_θ − ε_ref‖²; the t-dependent weight is dropped, as the
    simple DDPM loss drops it (with v-prediction, v differences are ε differences times a per-t factor).
    """
    error = F.mse_loss(pred.float(), reference_pred.float(), reduction="none")
    return error.mean(dim=tuple(range(1, error.ndim))).mean()


# ----------------------------------------------------------------------------------------------- trainer


@dataclass
class _Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor | None
    pooled: torch.Tensor | None
    prompts: list[str]
    time_ids: torch.Tensor
    masks: torch.Tensor | None
    n_instance: int


@dataclass
class _Inputs:
    """One step's U-Net inputs and regression target (epsilon or v)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    cond: dict[str, torch.Tensor]
    target: torch.Tensor

    def head(self, k: int) -> _Inputs:
        return _Inputs(
            self.noisy[:k],
            self.timesteps[:k],
            self.embeds[:k],
            {name: value[:k] for name, value in self.cond.items()},
            self.target[:k],
        )


class _Trainer:
    """State shared by the steps of one ``train_lora`` call; split out to keep each part short.

    ``init_lora`` (optional) is where the trainable U-Net adapter starts; when ``reference_adapter`` is set, a
    frozen copy of it is added under that name as the reference model.
    """

    needs_caches_when_done = False
    """True when ``final_metrics`` reads the caches, so they are loaded even if there is no step left."""

    def __init__(
        self,
        pipe,
        samples: Sequence[TrainingSample],
        config: TrainConfig,
        accelerator: Accelerator,
        init_lora: dict[str, torch.Tensor] | None = None,
    ):
        self.pipe = pipe
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.init_lora = init_lora
        self.init_text: dict[str, dict[str, torch.Tensor]] = {}
        if init_lora is not None:
            self.init_lora, self.init_text = split_init_lora(init_lora)
            if self.init_text and not config.train_text_encoder:
                raise CastloraError(
                    f"init_lora has a text-encoder LoRA ({sorted(self.init_text)}) but train_text_encoder=False "
                    "would drop it: set train_text_encoder=True (the settings of the run that produced init_lora)."
                )
        self.reference_adapter: str | None = REFERENCE_ADAPTER if config.kl_weight > 0 else None
        self.samples = self.training_samples(samples)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise CastloraError(
                f"Scheduler prediction_type {self.prediction_type!r} is not supported; use epsilon or v_prediction."
            )
        self.weight_dtype = _WEIGHT_DTYPES[config.mixed_precision] if self.device.type == "cuda" else torch.float32
        self.latents: dict[str, CachedLatent] = {}
        self.texts: dict[str, CachedText] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.cache_stats: dict[str, int] = {}

    def training_samples(self, samples: Sequence[TrainingSample]) -> list[TrainingSample]:
        """The samples this run caches and draws from (prior images only with prior preservation)."""
        used = [s for s in samples if self.config.prior_preservation or not s.is_prior]
        self.pools = SamplePools.of(used)
        self.pools.check(self.config.prior_preservation, self.config.segmix_p)
        return used

    # -- caches
    def build_caches(self, cache_dir: Path) -> None:
        pipe, config = self.pipe, self.config
        with self.accelerator.main_process_first():  # rank 0 encodes; the others then read its files
            pipe.vae.to(self.device)
            self.latents, latent_stats = build_latent_cache(pipe.vae, self.samples, config.resolution, cache_dir)
            self.cache_stats = {"latent_hits": latent_stats.hits, "latent_misses": latent_stats.misses}
            if not config.train_text_encoder:
                pipe.text_encoder.to(self.device)
                pipe.text_encoder_2.to(self.device)
                self.texts, text_stats = build_text_cache(pipe, [s.prompt for s in self.samples], cache_dir)
                self.cache_stats.update(text_hits=text_stats.hits, text_misses=text_stats.misses)
        latent_side = next(iter(self.latents.values())).latent.shape[-1]
        if config.masked_loss:
            self.masks = load_masks(self.samples, config.resolution, latent_side)

    def offload_encoders(self) -> None:
        """The VAE (and frozen text encoders) are not needed until training ends: move them off the GPU."""
        if self.device.type != "cuda":
            return
        self.pipe.vae.to("cpu")
        if not self.config.train_text_encoder:
            self.pipe.text_encoder.to("cpu")
            self.pipe.text_encoder_2.to("cpu")
        _free_accelerator_memory(self.device)

    # -- models
    def setup_models(self) -> None:
        pipe, config = self.pipe, self.config
        self.models: dict[str, torch.nn.Module] = {"unet": pipe.unet}
        if config.train_text_encoder:
            self.models.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
        groups = []
        for component, model in self.models.items():
            model.to(self.device)
            if self.weight_dtype != torch.float32:
                model.to(dtype=self.weight_dtype)
            spec = LoraSpec(rank=config.rank, alpha=config.alpha, target_modules=tuple(config.targets))
            params = _add_lora(model, spec, component != "unet", config.seed)
            if component == "unet" and self.init_lora is not None:
                params = self._start_from_init(model, spec)
            elif component in self.init_text:
                params = self._start_text_from_init(component, model, spec)
            lr = config.lr if component == "unet" else (config.text_encoder_lr or config.lr)
            groups.append({"params": params, "lr": lr})
            _set_gradient_checkpointing(model, config.gradient_checkpointing)
            model.train()
        self.params = [p for group in groups for p in group["params"]]
        self.text_params = [p for group in groups[1:] for p in group["params"]]
        self.optimizer = _make_optimizer(groups, config)
        self.lr_scheduler = _make_lr_scheduler(self.optimizer, config)

    def _start_from_init(self, unet: torch.nn.Module, spec: LoraSpec) -> list[torch.nn.Parameter]:
        """Load ``init_lora`` into the trainable adapter and, if needed, into a frozen reference adapter."""
        load_unet_lora(unet, self.init_lora, ADAPTER_NAME)
        if self.reference_adapter is not None:
            with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the global RNG as is
                add_unet_lora(unet, spec, adapter_name=self.reference_adapter)
            load_unet_lora(unet, self.init_lora, self.reference_adapter)
            activate_adapter(unet, ADAPTER_NAME)  # attaching activated (and unfroze) the reference
        _check_only_adapter_trains(unet, ADAPTER_NAME)
        return lora_parameters(unet)

    def _start_text_from_init(self, component: str, encoder: torch.nn.Module, spec: LoraSpec) -> list:
        """``_start_from_init`` for a text encoder: the trained adapter and the frozen reference start from
        ``init_lora``'s part for ``component``."""
        load_text_encoder_lora(encoder, self.init_text[component], ADAPTER_NAME)
        if self.reference_adapter is not None:
            with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the global RNG as is
                add_text_encoder_lora(encoder, spec, adapter_name=self.reference_adapter)
            load_text_encoder_lora(encoder, self.init_text[component], self.reference_adapter)
            activate_adapter(encoder, ADAPTER_NAME)
        _check_only_adapter_trains(encoder, ADAPTER_NAME)
        return lora_parameters(encoder)

    @torch.no_grad()
    def reference_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the reference model (the KL term's): the encoders with their frozen reference
        adapter, or with LoRA off where ``init_lora`` had no text-encoder part (what model k then used)."""
        encoders = [getattr(self.pipe, name) for name in ("text_encoder", "text_encoder_2")]
        for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=True):
            activate_or_disable(encoder, self.reference_adapter if name in self.init_text else None)
        try:
            return encode_prompts(self.pipe, prompts, self.device)
        finally:
            for encoder in encoders:
                activate_or_disable(encoder, ADAPTER_NAME)
                _check_only_adapter_trains(encoder, ADAPTER_NAME)

    def remove_reference(self) -> None:
        """Leave the models as a plain ``train_lora`` leaves them: only the trained adapter, active."""
        if self.reference_adapter is None:
            return
        unet = self.pipe.unet
        if self.reference_adapter in (getattr(unet, "peft_config", None) or {}):
            remove_adapter(unet, self.reference_adapter)
            activate_adapter(unet, ADAPTER_NAME)
        for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
            if self.reference_adapter in (getattr(encoder, "peft_config", None) or {}):
                remove_adapter(encoder, self.reference_adapter)
                activate_adapter(encoder, ADAPTER_NAME)

    def resume(self, state: TrainingState, folder: Path) -> None:
        _load_trainable_state(self.models, state.lora, folder)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)

    def prepare(self) -> None:
        # Only the U-Net is DDP-wrapped: encode_prompt calls the text encoders directly, so their LoRA
        # gradients are averaged by hand in ``_sync_text_grads``.
        self.unet, self.optimizer = self.accelerator.prepare(self.pipe.unet, self.optimizer)
        # The compiled callable wraps the prepared module (the order DDP wants) and shares its parameters;
        # pipe.unet, unwrap_model and every state dict stay uncompiled, so generation afterwards is unaffected.
        self.forward = _compiled(self.unet, self.device) if self.config.compile_unet else self.unet

    def state(self, step: int, losses: list[tuple[int, float, float]]) -> TrainingState:
        scaler = self.accelerator.scaler
        return TrainingState(
            step=step,
            lora=_trainable_state(self.models),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(),
            rng=capture_rng(),
            losses=list(losses),
            scaler=scaler.state_dict() if scaler is not None else None,
        )

    # -- one step
    def select(self, step: int) -> tuple[list[TrainingSample], int]:
        """This rank's samples of micro-batch ``step`` (instance first, then prior) and how many are instance
        samples. With gradient accumulation k, optimizer step s uses micro-batches s·k … s·k + k − 1."""
        config = self.config
        instance, prior = plan_step(
            self.pools,
            config.seed,
            step,
            config.batch_size * self.world,
            config.segmix_p,
            config.prior_preservation,
            config.segmix_draw,
        )
        mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
        return instance[mine] + prior[mine], len(instance[mine])

    def batch(self, step: int) -> _Batch:
        return self.assemble(*self.select(step))

    def assemble(self, chosen: list[TrainingSample], n_instance: int) -> _Batch:
        """Stack the cached latents, text embeddings and masks of ``chosen`` on the device."""
        config = self.config
        latents = torch.stack([self.latents[s.sample_id].latent for s in chosen])
        res = config.resolution
        # SDXL's micro-conditioning: original size, the centre crop's (top, left) and the target size, as in
        # diffusers' train_dreambooth_lora_sdxl.py.
        time_ids = torch.tensor(
            [
                [*self.latents[s.sample_id].original_size, *self.latents[s.sample_id].crop_top_left, res, res]
                for s in chosen
            ],
            dtype=torch.float32,
        )
        masks = None
        if config.masked_loss:
            ones = torch.ones_like(latents[0, :1])
            masks = torch.stack([self.masks.get(s.sample_id, ones) for s in chosen]).to(self.device)
        prompts = [s.prompt for s in chosen]
        embeds = pooled = None
        if not config.train_text_encoder:
            embeds = torch.stack([self.texts[p].prompt_embeds for p in prompts]).to(self.device, self.weight_dtype)
            pooled = torch.stack([self.texts[p].pooled for p in prompts]).to(self.device, self.weight_dtype)
        return _Batch(
            latents.to(self.device),
            embeds,
            pooled,
            prompts,
            time_ids.to(self.device, self.weight_dtype),
            masks,
            n_instance,
        )

    def draw(self, step: int, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise and timesteps, from a generator seeded by (seed, step, rank)."""
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, step, self.rank))
        noise = torch.randn(batch.latents.shape, generator=generator).to(self.device)
        n_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n_train, (batch.latents.shape[0],), generator=generator).to(self.device)
        return noise, timesteps

    def inputs(self, batch: _Batch, noise: torch.Tensor, timesteps: torch.Tensor) -> _Inputs:
        noisy = self.noise_scheduler.add_noise(batch.latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(batch.latents, noise, timesteps)
        embeds, pooled = batch.prompt_embeds, batch.pooled
        if embeds is None:
            embeds, pooled = encode_prompts(self.pipe, batch.prompts, self.device)
        cond = {"time_ids": batch.time_ids, "text_embeds": pooled.to(self.weight_dtype)}
        return _Inputs(noisy.to(self.weight_dtype), timesteps, embeds.to(self.weight_dtype), cond, target)

    def predict(self, inputs: _Inputs) -> torch.Tensor:
        """The trained model's prediction (through the DDP wrapper, so gradients are synchronised)."""
        with self.accelerator.autocast():
            return self.forward(inputs.noisy, inputs.timesteps, inputs.embeds, added_cond_kwargs=inputs.cond).sample

    def loss(self, step: int, batch: _Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        # Frozen predictions first: switching adapters flips requires_grad, best settled before the graph exists.
        reference_text = None
        if config.kl_weight > 0 and config.train_text_encoder:  # model k's own text encoders, not the trained ones
            reference_text = self.reference_text(batch.prompts[: batch.n_instance])
        inputs = self.inputs(batch, *self.draw(step, batch))
        k = batch.n_instance
        anchor = None
        if config.kl_weight > 0:
            head = inputs.head(k)
            if reference_text is not None:
                embeds, pooled = (t.to(self.weight_dtype) for t in reference_text)
                head = _Inputs(head.noisy, head.timesteps, embeds, {**head.cond, "text_embeds": pooled}, head.target)
            anchor = self.frozen_pred(head, self.reference_adapter)
        base = self.frozen_pred(inputs.head(k), None) if config.dco_beta > 0 else None
        pred = self.predict(inputs)
        errors = per_sample_error(pred, inputs.target, batch.masks, config.mask_normalization)
        parts: dict[str, torch.Tensor] = {}  # detached; read (a device sync) only when logged
        if base is not None:
            instance_masks = None if batch.masks is None else batch.masks[:k]
            ref_errors = per_sample_error(base, inputs.target[:k], instance_masks, config.mask_normalization)
            instance_loss = dco_loss(errors[:k], ref_errors, config.dco_beta)
            parts["reference_mse"] = ref_errors.detach().mean()
        else:
            instance_loss = errors[:k].mean()
        parts["instance_mse"] = errors[:k].detach().mean()
        loss = instance_loss
        if anchor is not None:
            kl = kl_to_reference(pred[:k], anchor)
            parts["kl"] = kl.detach()
            loss = loss + config.kl_weight * kl
        if config.prior_preservation and errors.shape[0] > k:
            prior_loss = errors[k:].mean()
            parts["prior_mse"] = prior_loss.detach()
            loss = loss + config.prior_weight * prior_loss
        return loss, parts

    @torch.no_grad()
    def frozen_pred(self, inputs: _Inputs, adapter: str | None) -> torch.Tensor:
        """A no-grad prediction of the unwrapped U-Net (no DDP hooks) with ``adapter`` active instead of the
        trained one, or with every LoRA off when ``adapter`` is None (DCO's reference: LoRA scale 0)."""
        unet = self.accelerator.unwrap_model(self.unet)
        if adapter is None:
            unet.disable_adapters()
        else:
            activate_adapter(unet, adapter)
        try:
            with self.accelerator.autocast():
                return unet(inputs.noisy, inputs.timesteps, inputs.embeds, added_cond_kwargs=inputs.cond).sample
        finally:
            if adapter is None:
                unet.enable_adapters()
            else:
                activate_adapter(unet, ADAPTER_NAME)
                _check_only_adapter_trains(unet, ADAPTER_NAME)

    def final_metrics(self) -> dict[str, Any]:
        """Extra metrics computed once training ends (none here; the preference trainer evaluates its pairs)."""
        return {}

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of one micro-batch, scaled so ``k`` micro-batches average like one batch.

        Only the last micro-batch of an optimizer step synchronises DDP gradients (the others add locally).
        """
        scaled = loss / self.config.gradient_accumulation_steps
        if last or self.world == 1:
            self.accelerator.backward(scaled)
        else:
            with self.accelerator.no_sync(self.unet):
                self.accelerator.backward(scaled)

    def optimize(self) -> None:
        """One optimizer step on the gradients ``backward`` accumulated, then clear them."""
        self._sync_text_grads()
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync_text_grads(self) -> None:
        if self.world == 1 or not self.text_params:
            return
        for param in self.text_params:
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def agree(self, flag: bool) -> bool:
        """True on every rank when the main process says so (e.g. a stop request seen only there)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag and self.accelerator.is_main_process else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1)
        if self.world > 1:
            value = self.accelerator.reduce(value, reduction="mean")
        return float(value.item())

    def restore_encoders(self, devices: dict[str, torch.device]) -> None:
        for name, device in devices.items():
            getattr(self.pipe, name).to(device)
        for model in self.models.values():
            model.eval()


def fingerprint_fields(
    pipe,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    world_size: int,
    base_model_id: str | None,
    init_lora: dict[str, torch.Tensor] | None = None,
    preference: bool = False,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: settings that change the weights, data, base model and
    starting LoRA (the ``init_lora`` key exists only when one is given, so older checkpoints still match).
    ``preference``: the Diffusion-DPO objective, the only one ``dpo_beta`` acts in."""
    used = [s for s in samples if config.prior_preservation or not s.is_prior]
    fields = {
        "config": config.identity_fields(preference),
        "samples": sha256_json(samples_fingerprint_items(used)),
        "base_model": base_model_id or str(getattr(pipe, "name_or_path", "") or ""),
        "unet": module_identity(pipe.unet),
        "world_size": world_size,
    }
    if init_lora is not None:
        fields["init_lora"] = lora_state_hash(init_lora)
    return fields


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for ``config``. accelerate keeps one process-wide state and refuses a second
    mixed-precision setting; a single process (tests, notebooks, a code location training twice) may
    safely reset it, a distributed one may not."""
    from accelerate.state import AcceleratorState, PartialState

    # cpu=True without CUDA lets accelerate pick gloo DDP under torchrun / `accelerate launch` on CPU machines.
    kwargs = {"mixed_precision": config.mixed_precision, "cpu": not torch.cuda.is_available()}
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise CastloraError(
                f"Cannot switch mixed_precision to {config.mixed_precision!r} inside a distributed run: {exc}"
            ) from exc
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _check_mixed_precision(config: TrainConfig) -> None:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CastloraError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU.")


def train_lora(
    pipe,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    out_dir: Path,
    cache_dir: Path,
    on_log: LogCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_model_id: str | None = None,
    init_lora: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train (or resume training) a LoRA on ``pipe``'s U-Net; checkpoints go to ``out_dir/checkpoints``.

    Resumes automatically from the newest checkpoint in ``out_dir`` (raising CheckpointError if it is
    corrupt or from another setup). ``on_log(step, metrics)`` runs on the main process every
    ``log_every`` steps; ``should_stop()`` is polled after each step, and a stop writes a checkpoint first.
    ``init_lora`` (a ``TrainResult.lora_state``, or an exported diffusers file's tensors, which may add
    ``text_encoder.``/``text_encoder_2.`` parts; same rank and targets as ``config``) is the adapters' starting
    point instead of fresh ones; its hash joins the checkpoint fingerprint. With ``config.kl_weight`` > 0 it is
    also the frozen reference of the KL term (logged as ``kl``), text encoders included.
    On return the U-Net carries the trained adapter (active), so ``pipe`` can render validation images.
    """
    if config.kl_weight > 0 and init_lora is None:
        raise CastloraError(
            f"kl_weight={config.kl_weight} regularises towards a previous model, but no init_lora was given: "
            "pass the previous round's LoRA state as init_lora, or set kl_weight=0."
        )
    _check_mixed_precision(config)
    accelerator = _make_accelerator(config)
    fields = fingerprint_fields(pipe, samples, config, accelerator.num_processes, base_model_id, init_lora)
    trainer = _Trainer(pipe, samples, config, accelerator, init_lora)
    return run_trainer(trainer, fields, Path(out_dir), Path(cache_dir), on_log, should_stop)


def run_trainer(
    trainer: _Trainer,
    fields: dict[str, Any],
    out_dir: Path,
    cache_dir: Path,
    on_log: LogCallback | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """The resumable, checkpointing step loop shared by every objective (``trainer.loss`` decides which)."""
    pipe, config, accelerator = trainer.pipe, trainer.config, trainer.accelerator
    resume = load_latest_checkpoint(out_dir, fields)
    start = resume[0].step if resume else 0
    original_devices = {name: getattr(pipe, name).device for name in ("vae", "text_encoder", "text_encoder_2")}

    started = time.perf_counter()
    if start < config.steps or trainer.needs_caches_when_done:
        trainer.build_caches(cache_dir)
        trainer.offload_encoders()
    cache_seconds = time.perf_counter() - started
    try:
        trainer.setup_models()
        losses: list[tuple[int, float, float]] = []
        if resume:
            trainer.resume(*resume)
            losses = [entry for entry in resume[0].losses if entry[0] <= start]
        trainer.prepare()
        if resume and resume[0].scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resume[0].scaler)

        step_times: list[float] = []
        last_saved = start if resume else None
        done = start
        window: list[float] = []
        accumulation = config.gradient_accumulation_steps
        for step in range(start, config.steps):
            tick = time.perf_counter()
            lr = float(trainer.lr_scheduler.get_last_lr()[0])
            micro_losses, micro_parts = [], []
            for micro in range(accumulation):
                index = step * accumulation + micro  # micro-batch index: the plan and noise are keyed by it
                loss, micro_part = trainer.loss(index, trainer.batch(index))
                trainer.backward(loss, last=micro == accumulation - 1)
                micro_losses.append(loss.detach())
                micro_parts.append(micro_part)
            trainer.optimize()
            loss = torch.stack(micro_losses).mean()
            parts = {k: torch.stack([p[k] for p in micro_parts]).float().mean() for k in micro_parts[0]}
            done = step + 1
            loss_value = trainer.mean_over_ranks(loss)
            losses.append((done, loss_value, lr))
            window.append(loss_value)
            step_times.append(time.perf_counter() - tick)
            if (
                on_log is not None
                and accelerator.is_main_process
                and (done % config.log_every == 0 or done == config.steps)
            ):
                on_log(
                    done,
                    {
                        "loss": float(np.mean(window)),
                        "lr": lr,
                        "step_time_s": step_times[-1],
                        **{k: float(v) for k, v in parts.items()},
                    },
                )
                window = []
            stop = trainer.agree(bool(should_stop and accelerator.is_main_process and should_stop()))
            if done % config.checkpoint_every == 0 or done == config.steps or stop:
                _save(trainer, out_dir, done, losses, fields)
                last_saved = done
            if stop:
                break
        if last_saved != done:
            _save(trainer, out_dir, done, losses, fields)
        final_metrics = trainer.final_metrics()
    finally:
        trainer.remove_reference()

    trainer.restore_encoders(original_devices)
    unwrapped = accelerator.unwrap_model(trainer.unet)
    timed = step_times[1:] or step_times  # the first step pays one-off warm-up costs
    metrics = {
        **trainer.cache_stats,
        "cache_seconds": cache_seconds,
        "mean_step_s": float(np.mean(timed)) if timed else None,
        "steps_this_run": len(step_times),
        "mask_normalization": config.mask_normalization if config.masked_loss else None,
        "world_size": accelerator.num_processes,
        "checkpoints": [str(p) for _, p in list_checkpoints(out_dir)],
        **final_metrics,
        **_peak_memory_mb(accelerator.device),
    }
    return TrainResult(
        steps_done=done,
        final_loss=losses[-1][1] if losses else None,
        losses=losses,
        lora_state=_cpu_copy(unet_lora_state_dict(unwrapped, ADAPTER_NAME)),
        resumed_from=start if resume else None,
        text_encoder_lora_states={
            name: _cpu_copy(text_encoder_lora_state_dict(model, ADAPTER_NAME))
            for name, model in trainer.models.items()
            if name != "unet"
        },
        metrics=metrics,
    )


def _save(trainer: _Trainer, out_dir: Path, step: int, losses, fields: dict[str, Any]) -> None:
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out_dir, trainer.state(step, losses), fields, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
