"""The LoRA trainer: the state of one training run and its hooks, written against a model family
(docs/design.md#model-families) so nothing here depends on the base model.

``pipeline.train.loop.run_trainer`` drives a ``Trainer`` through its hooks, in this order:

1. ``build_caches`` / ``offload_encoders``: content-keyed latents and prompt embeddings, then the VAE and frozen
   text encoders leave the accelerator (``run_trainer`` puts them back however the run ends);
2. ``setup_models``: a seeded fresh adapter on each LoRA component (or ``init_lora``'s weights, plus a frozen
   ``REFERENCE_ADAPTER`` copy when an objective needs the previous model), optimiser and LR schedule;
3. ``resume`` (from a checkpoint) and ``prepare`` (DDP wrapping, torch.compile);
4. per micro-batch ``batch`` (= ``assemble(*select(step))``) → ``loss`` (``draw`` noise and timesteps →
   ``inputs`` → ``predict`` / ``frozen_pred``) → ``backward``; per optimizer step ``optimize``;
5. ``state`` for checkpoints, ``final_metrics`` and ``remove_reference`` at the end.

An objective is a subclass overriding ``select``, ``draw``, ``loss`` and ``final_metrics``
(``pipeline.train.preference`` is Diffusion-DPO's). Every random draw of a step comes from generators seeded
by (seed, step, rank), so an interrupted and resumed run follows the same path as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.buckets import Bucket, bucket_sizes
from pipeline.errors import CastloraError
from pipeline.families import ImageGeometry, family_for
from pipeline.lora.adapters import LoraSpec, activate_adapter
from pipeline.lora.training import (
    ADAPTER_NAME,
    REFERENCE_ADAPTER,
    activate_or_disable,
    add_fresh_lora,
    check_only_adapter_trains,
    load_trainable_state,
    remove_reference_lora,
    split_init_lora,
    start_from_lora,
    trainable_state,
)
from pipeline.train.bucketing import bucket_latents, build_bucketed_latents, load_bucketed_masks, place_samples
from pipeline.train.caches import CachedLatent, CachedText, build_text_cache
from pipeline.train.checkpoint import TrainingState, capture_rng, restore_rng
from pipeline.train.config import TrainConfig
from pipeline.train.data import SamplePools, TrainingSample, plan_bucketed_step
from pipeline.train.losses import dco_loss, kl_to_reference, per_sample_error
from pipeline.train.runtime import (
    WEIGHT_DTYPES,
    average_gradients,
    compiled,
    free_accelerator_memory,
    make_lr_scheduler,
    make_optimizer,
    set_gradient_checkpointing,
    step_seed,
)


@dataclass
class Batch:
    """One micro-batch on the device: instance samples first, then prior samples."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor | None
    """Cached token embeddings, or None when the text encoders train (encoded per step)."""
    pooled: torch.Tensor | None
    prompts: list[str]
    conditioning: dict[str, torch.Tensor]
    """The family's extra conditioning (SDXL: ``time_ids``)."""
    masks: torch.Tensor | None
    n_instance: int


@dataclass
class StepInputs:
    """One step's denoiser inputs and regression target (what the family's objective says)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    target: torch.Tensor

    def head(self, k: int) -> StepInputs:
        """The first ``k`` samples (the instance part of a batch)."""
        conditioning = {name: value[:k] for name, value in self.conditioning.items()}
        return StepInputs(
            self.noisy[:k], self.timesteps[:k], self.embeds[:k], self.pooled[:k], conditioning, self.target[:k]
        )


class Trainer:
    """State shared by the steps of one ``train_lora`` call: DreamBooth-LoRA with prior preservation, masked
    loss, and optionally DCO and MuDI's KL anchor.

    ``init_lora`` (optional) is where the trainable adapters start; when ``reference_adapter`` is set, a
    frozen copy of it is added under that name as the reference model.
    """

    needs_caches_when_done = False
    """True when ``final_metrics`` reads the caches, so they are loaded even if there is no step left."""

    def __init__(
        self,
        pipe: Any,
        samples: Sequence[TrainingSample],
        config: TrainConfig,
        accelerator: Accelerator,
        init_lora: dict[str, torch.Tensor] | None = None,
    ):
        self.pipe = pipe
        self.family = family_for(pipe).with_options(config)  # FLUX: σ sampling, training guidance
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.init_lora = init_lora
        self.init_text: dict[str, dict[str, torch.Tensor]] = {}
        if init_lora is not None:
            self.init_lora, self.init_text = split_init_lora(init_lora, self.family.denoiser, self.family.text_encoders)
            if self.init_text and not config.train_text_encoder:
                raise CastloraError(
                    f"init_lora has a text-encoder LoRA ({sorted(self.init_text)}) but train_text_encoder=False "
                    "would drop it: set train_text_encoder=True (the settings of the run that produced init_lora)."
                )
        self.reference_adapter: str | None = REFERENCE_ADAPTER if config.kl_weight > 0 else None
        self.samples = self.training_samples(samples)
        self.buckets = bucket_sizes(config.buckets, config.resolution, self.family.size_multiple(pipe))
        self.bucketed = place_samples(self.samples, self.buckets)  # docs/design.md#aspect-ratio-buckets
        self.objective = self.family.objective(pipe)
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision] if self.device.type == "cuda" else torch.float32
        self.latents: dict[tuple[str, Bucket], CachedLatent] = {}  # a prior sample may be in several buckets
        self.texts: dict[str, CachedText] = {}
        self.masks: dict[tuple[str, Bucket], torch.Tensor] = {}
        self.cache_stats: dict[str, int] = {}
        self.models: dict[str, torch.nn.Module] = {}

    def training_samples(self, samples: Sequence[TrainingSample]) -> list[TrainingSample]:
        """The samples this run caches and draws from (prior images only with prior preservation)."""
        used = [s for s in samples if self.config.prior_preservation or not s.is_prior]
        self.pools = SamplePools.of(used)
        self.pools.check(self.config.prior_preservation, self.config.segmix_p)
        return used

    # -- caches
    def _cached_encoders(self) -> dict[str, torch.nn.Module]:
        """The frozen encoders whose outputs are cached: the VAE, and the text encoders unless they train."""
        family = self.family
        encoders = family.frozen_encoders(self.pipe)
        if self.config.train_text_encoder:
            return {name: module for name, module in encoders.items() if name not in family.text_encoders}
        return encoders

    def build_caches(self, cache_dir: Path) -> None:
        pipe, config, family = self.pipe, self.config, self.family
        with self.accelerator.main_process_first():  # rank 0 encodes; the others then read its files
            vae = family.component(pipe, family.vae).to(self.device)
            encode = partial(family.encode_pixels, pipe)
            self.latents, self.cache_stats = build_bucketed_latents(
                vae, self.bucketed, config.resolution, cache_dir, encode
            )
            if not config.train_text_encoder:
                for name in family.text_encoders:
                    family.component(pipe, name).to(self.device)
                self.texts, text_stats = build_text_cache(pipe, [s.prompt for s in self.samples], cache_dir)
                self.cache_stats.update(text_hits=text_stats.hits, text_misses=text_stats.misses)
        if config.masked_loss:
            self.masks = load_bucketed_masks(self.bucketed, self.latents)

    def offload_encoders(self) -> None:
        """The VAE (and frozen text encoders) are not needed until training ends: move them off the GPU."""
        if self.device.type != "cuda":
            return
        for module in self._cached_encoders().values():
            module.to("cpu")
        free_accelerator_memory(self.device)

    # -- models
    def setup_models(self) -> None:
        config, family = self.config, self.family
        self.models = family.lora_components(self.pipe, config.train_text_encoder)
        spec = LoraSpec(rank=config.rank, alpha=config.alpha, target_modules=tuple(config.targets))
        groups = []
        for component, model in self.models.items():
            model.to(self.device)
            if self.weight_dtype != torch.float32:
                model.to(dtype=self.weight_dtype)
            params = add_fresh_lora(family, component, model, spec, config.seed)
            start = self.init_lora if component == family.denoiser else self.init_text.get(component)
            if start is not None:
                params = start_from_lora(family, component, model, spec, start, self.reference_adapter is not None)
            lr = config.lr if component == family.denoiser else (config.text_encoder_lr or config.lr)
            groups.append({"params": params, "lr": lr})
            set_gradient_checkpointing(model, config.gradient_checkpointing)
            model.train()
        self.params = [p for group in groups for p in group["params"]]
        self.text_params = [p for group in groups[1:] for p in group["params"]]
        self.optimizer = make_optimizer(groups, config)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, config)

    @torch.no_grad()
    def reference_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the reference model (the KL term's): the encoders with their frozen reference
        adapter, or with LoRA off where ``init_lora`` had no text-encoder part (what model k then used)."""
        # Only the encoders that carry LoRA switch (FLUX trains CLIP's, never T5's).
        names = [name for name in self.family.lora_components(self.pipe, True) if name != self.family.denoiser]
        encoders = [self.family.component(self.pipe, name) for name in names]
        for name, encoder in zip(names, encoders, strict=True):
            activate_or_disable(encoder, self.reference_adapter if name in self.init_text else None)
        try:
            return self.family.encode_prompts(self.pipe, prompts, self.device)
        finally:
            for encoder in encoders:
                activate_or_disable(encoder, ADAPTER_NAME)
                check_only_adapter_trains(encoder, ADAPTER_NAME)

    def remove_reference(self) -> None:
        """Leave the models as a plain ``train_lora`` leaves them: only the trained adapter, active."""
        if self.reference_adapter is not None:
            remove_reference_lora(self.family, self.pipe)

    def resume(self, state: TrainingState, folder: Path) -> None:
        load_trainable_state(self.models, state.lora, folder)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.scheduler)
        restore_rng(state.rng)

    def prepare(self) -> None:
        # Only the denoiser is DDP-wrapped: prompt encoding calls the text encoders directly, so their LoRA
        # gradients are averaged by hand in ``optimize``.
        denoiser = self.family.component(self.pipe, self.family.denoiser)
        self.denoiser, self.optimizer = self.accelerator.prepare(denoiser, self.optimizer)
        # The compiled callable wraps the prepared module (the order DDP wants) and shares its parameters; the
        # pipeline's module, unwrap_model and every state dict stay uncompiled, so generation is unaffected.
        self.forward = compiled(self.denoiser, self.device) if self.config.compile_unet else self.denoiser

    def state(self, step: int, losses: list[tuple[int, float, float]]) -> TrainingState:
        scaler = self.accelerator.scaler
        return TrainingState(
            step=step,
            lora=trainable_state(self.models),
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
        draws = (config.batch_size * self.world, config.segmix_p, config.prior_preservation, config.segmix_draw)
        _, instance, prior = plan_bucketed_step(self.bucketed, config.seed, step, *draws)  # all in one bucket
        mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
        return instance[mine] + prior[mine], len(instance[mine])

    def batch(self, step: int) -> Batch:
        return self.assemble(*self.select(step))

    def assemble(self, chosen: list[TrainingSample], n_instance: int) -> Batch:
        """Stack the cached latents, text embeddings, conditioning and masks of ``chosen`` on the device, in the
        bucket of its first sample (an instance sample, in its own bucket)."""
        config = self.config
        bucket = self.bucketed.home[chosen[0].sample_id]
        cached = bucket_latents(self.latents, chosen, bucket)
        latents = torch.stack([entry.latent for entry in cached])
        geometries = [ImageGeometry(entry.original_size, entry.crop_top_left, bucket.size) for entry in cached]
        conditioning = {
            name: value.to(self.device, self.weight_dtype)
            for name, value in self.family.conditioning(geometries, config.resolution).items()
        }
        masks = None
        if config.masked_loss:
            ones = torch.ones_like(latents[0, :1])
            masks = torch.stack([self.masks.get((s.sample_id, bucket), ones) for s in chosen]).to(self.device)
        prompts = [s.prompt for s in chosen]
        embeds = pooled = None
        if not config.train_text_encoder:
            embeds = torch.stack([self.texts[p].prompt_embeds for p in prompts]).to(self.device, self.weight_dtype)
            pooled = torch.stack([self.texts[p].pooled for p in prompts]).to(self.device, self.weight_dtype)
        return Batch(latents.to(self.device), embeds, pooled, prompts, conditioning, masks, n_instance)

    def draw(self, step: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise and timesteps, from a generator seeded by (seed, step, rank)."""
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, self.rank))
        noise = torch.randn(batch.latents.shape, generator=generator).to(self.device)
        timesteps = self.objective.draw_timesteps(batch.latents.shape[0], generator).to(self.device)
        return noise, timesteps

    def inputs(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor) -> StepInputs:
        noisy, target = self.objective.noisy_and_target(batch.latents, noise, timesteps)
        embeds, pooled = batch.prompt_embeds, batch.pooled
        if embeds is None:
            embeds, pooled = self.family.encode_prompts(self.pipe, batch.prompts, self.device)
        wd = self.weight_dtype
        return StepInputs(noisy.to(wd), timesteps, embeds.to(wd), pooled.to(wd), batch.conditioning, target)

    def _predict_with(self, denoiser: Any, inputs: StepInputs) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.family.predict(
                denoiser, inputs.noisy, inputs.timesteps, inputs.embeds, inputs.pooled, inputs.conditioning
            )

    def predict(self, inputs: StepInputs) -> torch.Tensor:
        """The trained model's prediction (through the DDP wrapper, so gradients are synchronised)."""
        return self._predict_with(self.forward, inputs)

    def loss(self, step: int, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
                head = replace(head, embeds=embeds, pooled=pooled)
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
    def frozen_pred(self, inputs: StepInputs, adapter: str | None) -> torch.Tensor:
        """A no-grad prediction of the unwrapped denoiser (no DDP hooks) with ``adapter`` active instead of the
        trained one, or with every LoRA off when ``adapter`` is None (DCO's reference: LoRA scale 0)."""
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        if adapter is None:
            denoiser.disable_adapters()
        else:
            activate_adapter(denoiser, adapter)
        try:
            return self._predict_with(denoiser, inputs)
        finally:
            if adapter is None:
                denoiser.enable_adapters()
            else:
                activate_adapter(denoiser, ADAPTER_NAME)
                check_only_adapter_trains(denoiser, ADAPTER_NAME)

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
            with self.accelerator.no_sync(self.denoiser):
                self.accelerator.backward(scaled)

    def optimize(self) -> None:
        """One optimizer step on the gradients ``backward`` accumulated, then clear them."""
        if self.world > 1:  # prompt encoding runs outside DDP: average the text encoders' gradients by hand
            average_gradients(self.accelerator, self.text_params)
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
