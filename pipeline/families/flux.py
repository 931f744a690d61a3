"""FLUX.1 as a model family (docs/design.md#flux1): a flow-matching MMDiT (``FluxTransformer2DModel``) on 16-channel
latents packed into 2x2 patches, T5 token embeddings as context and CLIP's pooled embedding, a guidance embedding
for the guidance-distilled models, PEFT LoRA on the joint-attention projections of both streams, and the
diffusers/PEFT LoRA file that ``FluxPipeline.load_lora_weights`` loads.

Model latents stay unpacked ``(N, 16, h, w)`` everywhere outside this module (caches, masks, MuDI's
``ε + γ·M⊙z``); ``predict`` and ``render`` pack them, exactly as ``FluxPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import CastloraError
from pipeline.families.base import ImageGeometry, ModelFamily, RenderRequest
from pipeline.families.flow_matching import FlowMatchingObjective
from pipeline.lora.adapters import (
    TEXT_ENCODER_TARGETS,
    LoraError,
    LoraSpec,
    add_text_encoder_lora,
    add_unet_lora,
    check_lora_state_matches,
    load_text_encoder_lora,
    lora_config,
    text_encoder_lora_state_dict,
)
from pipeline.lora.export import DIFFUSERS_WEIGHT_NAME
from pipeline.lora.kohya_flux import KOHYA_FLUX_WEIGHT_NAME, kohya_flux_module_map, save_kohya_flux_lora
from pipeline.models.base_model import BaseModelSpec, load_diffusers_pipeline
from pipeline.models.identity import module_identity
from pipeline.storage.atomic import atomic_path
from pipeline.storage.hashing import sha256_json
from pipeline.storage.tensor_files import canonicalize_safetensors

MAX_SEQUENCE_LENGTH = 512
"""FluxPipeline's default (and largest) T5 sequence; a tokenizer with a shorter ``model_max_length`` caps it."""
ATTENTION_COUNTERPARTS: dict[str, str] = {
    "to_q": "add_q_proj",
    "to_k": "add_k_proj",
    "to_v": "add_v_proj",
    "to_out.0": "to_add_out",
}
"""Image-stream projection → its text-stream counterpart in a double-stream block's joint attention."""
FLUX_TARGETS: tuple[str, ...] = (*ATTENTION_COUNTERPARTS, *ATTENTION_COUNTERPARTS.values())
"""The reference script's attention targets: q/k/v/out of both streams (single blocks have q/k/v only)."""
FLUX_FEED_FORWARD_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
"""Optional feed-forward targets of the double-stream blocks (name them in ``targets`` to train them)."""


def flux_lora_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The modules that get LoRA for ``targets``: each attention projection named (``TrainConfig.targets`` defaults to
    q/k/v/out) together with its text-stream counterpart, as in diffusers' ``train_dreambooth_lora_flux.py``;
    other names (FLUX's own, e.g. the feed-forward ones) as given."""
    found = list(targets)
    for target in targets:
        counterpart = ATTENTION_COUNTERPARTS.get(target.removeprefix("attn."))
        if counterpart is not None:
            found.append(counterpart)
    return tuple(dict.fromkeys(found))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) → (N, h/2 · w/2, 4C): FluxPipeline's 2x2 patch packing (row-major patches)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise CastloraError(
            f"FLUX packs 2x2 latent patches: the latent grid {h}x{w} must be even, i.e. image sides multiples of 16."
        )
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a latent grid of ``height`` x ``width`` cells."""
    n, _, channels = packed.shape
    patches = packed.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (h/2 · w/2, 3) of the packed tokens: (0, row, column), as ``_prepare_latent_image_ids``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _unwrapped(module: Any) -> Any:
    """The model inside a DDP (``module``) or ``torch.compile`` (``_orig_mod``) wrapper."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


class FluxFamily(ModelFamily):
    name = "flux"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    """CLIP-L (pooled) and T5 (token embeddings); only CLIP gets a LoRA when text encoders train, as in the
    reference script and the diffusers file format."""
    patch_size = 2

    options = frozenset(
        {"sigma_sampling", "logit_mean", "logit_std", "mode_scale", "training_guidance", "true_cfg_scale"}
    )
    """Run settings only FLUX reads (``TrainConfig``'s σ sampling and training guidance, the render settings'
    ``true_cfg_scale``): docs/design.md#flux1-run-settings."""

    def __init__(
        self,
        training_guidance: float = 1.0,
        true_cfg_scale: float = 1.0,
        sigma_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ):
        self.training_guidance = float(training_guidance)
        """The guidance embedding a guidance-distilled model trains with (the reference script's
        ``--guidance_scale``)."""
        self.true_cfg_scale = float(true_cfg_scale)
        """> 1: render a negative prompt with true classifier-free guidance at this scale (two transformer calls
        per step); 1: FLUX.1-dev's usual rendering, where a negative prompt has no effect and is not passed."""
        self.sigma_sampling = sigma_sampling
        """How training draws σ: ``uniform``, ``logit_normal`` or ``mode`` (``FlowMatchingObjective``)."""
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        if self.true_cfg_scale < 1:
            raise CastloraError(f"true_cfg_scale={true_cfg_scale} must be >= 1 (1: off, no true CFG).")

    def configured(self, options: Mapping[str, Any]) -> FluxFamily:
        current = {name: getattr(self, name) for name in self.options}
        return FluxFamily(**{**current, **options})

    def handles(self, pipe: Any) -> bool:
        return isinstance(pipe, FluxPipeline)

    def load(self, spec: BaseModelSpec, cache_root: Path) -> FluxPipeline:
        return load_diffusers_pipeline(spec, cache_root, FluxPipeline, "base model (FLUX.1)")

    def lora_components(self, pipe: Any, train_text_encoders: bool) -> dict[str, torch.nn.Module]:
        # T5 never trains but runs inside the graph when the CLIP LoRA trains: keep it from collecting gradients.
        pipe.text_encoder_2.requires_grad_(False)
        names = (self.denoiser, *(("text_encoder",) if train_text_encoders else ()))
        return {name: self.component(pipe, name) for name in names}

    # -- prompts
    def max_sequence_length(self, pipe: Any) -> int:
        """T5 tokens per prompt: FluxPipeline's 512, or fewer when the tokenizer's ``model_max_length`` is smaller."""
        return min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer_2.model_max_length))

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length(pipe),
        )
        return embeds, pooled

    def prompt_encoder_identity(self, pipe: Any) -> str:
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        vocab = [sha256_json(sorted(t.get_vocab().items())) for t in tokenizers]
        return sha256_json(
            {
                "modules": module_identity(pipe.text_encoder, pipe.text_encoder_2),
                "tokenizers": vocab,
                "max_sequence_length": self.max_sequence_length(pipe),
            }
        )

    # -- latents
    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels) // 4

    def downsampling_factor(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor)

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        """FluxPipeline draws its noise in the prompt embeddings' dtype: T5's."""
        return pipe.text_encoder_2.dtype

    # -- training
    def objective(self, pipe: Any) -> FlowMatchingObjective:
        """σ drawn as configured; a training guidance other than 1.0 is refused for a transformer without a guidance
        embedding (FLUX.1-schnell), which would silently ignore it."""
        if self.training_guidance != 1.0 and not _unwrapped(pipe.transformer).config.guidance_embeds:
            raise CastloraError(
                f"training_guidance={self.training_guidance:g}: this FLUX.1 transformer has no guidance embedding "
                "(guidance_embeds=false, e.g. FLUX.1-schnell), so the value would be ignored; leave it at 1.0."
            )
        return FlowMatchingObjective(
            pipe.scheduler.config,
            weighting=self.sigma_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        )

    def conditioning(self, geometries: Sequence[ImageGeometry], resolution: int) -> dict[str, torch.Tensor]:
        """The guidance value per sample (used only by guidance-distilled transformers)."""
        del resolution
        return {"guidance": torch.full((len(geometries),), self.training_guidance, dtype=torch.float32)}

    def predict(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Pack ``noisy`` (N, 16, h, w), run the transformer at ``timestep = t / 1000`` (σ) with text ids 0 and the
        packed tokens' (0, row, column) ids, unpack the velocity back to (N, 16, h, w)."""
        n, _, height, width = noisy.shape
        guidance = None
        if _unwrapped(denoiser).config.guidance_embeds:
            guidance = conditioning.get("guidance")
            if guidance is None:
                guidance = torch.full((n,), self.training_guidance)
            guidance = guidance.to(noisy.device, torch.float32)
        output = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=(timesteps.to(noisy.device, noisy.dtype) / 1000),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(height, width, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    # -- LoRA
    def add_lora(self, component: str, model: torch.nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        if component == self.denoiser:
            targets = flux_lora_targets(spec.target_modules)
            add_unet_lora(model, replace(spec, target_modules=targets), adapter_name=adapter_name)
        elif component == "text_encoder":
            add_text_encoder_lora(model, spec, adapter_name=adapter_name)
        else:
            raise LoraError(f"FLUX trains no LoRA on {component!r}; only the transformer and the CLIP text encoder.")

    def lora_state_dict(self, component: str, model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Transformer: PEFT naming with ``transformer.`` (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``,
        as FluxPipeline.save_lora_weights writes); CLIP: classic ``text_model.`` paths with ``lora_A``/``lora_B``,
        no prefix (the exporter adds ``text_encoder.``), as the diffusers file holds them."""
        if component != self.denoiser:
            return _peft_named(text_encoder_lora_state_dict(model, adapter_name))
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return {f"{self.denoiser}.{key}": value.detach().contiguous() for key, value in state.items()}

    def load_lora(
        self, component: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str
    ) -> None:
        if component != self.denoiser:
            load_text_encoder_lora(model, _linear_layer_named(state), adapter_name)
            return
        suffix = f".{adapter_name}.weight"
        params = {
            f"{self.denoiser}.{name[: -len(suffix)]}.weight": param
            for name, param in model.named_parameters()
            if name.endswith(suffix) and (".lora_A." in name or ".lora_B." in name)
        }
        check_lora_state_matches({key: tuple(p.shape) for key, p in params.items()}, state, "transformer LoRA")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key].to(param.device, param.dtype))

    def kohya_lora_modules(self, pipe: Any) -> dict[str, tuple[tuple[str, slice], ...]]:
        """Kohya FLUX names of the transformer's block layers, q/k/v (and ``proj_mlp``) fused as the export fuses
        them (``kohya_flux_module_map``)."""
        config = pipe.transformer.config
        width = int(config.num_attention_heads) * int(config.attention_head_dim)
        return kohya_flux_module_map(int(config.num_layers), int(config.num_single_layers), width)

    def export_lora(
        self, out_dir: Path, pipe: Any, spec: LoraSpec, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Path]:
        """``pytorch_lora_weights.safetensors`` through ``FluxPipeline.save_lora_weights`` with PEFT's adapter
        config as metadata (so loaders apply alpha/rank), and the kohya/ComfyUI FLUX file of the transformer LoRA
        (``lora_kohya_flux.safetensors``, q/k/v fused: ``pipeline/lora/kohya_flux.py``)."""
        out_dir = Path(out_dir)
        adapter = _single_adapter(pipe.transformer)
        prefix = f"{self.denoiser}."
        state = {
            k.removeprefix(prefix): v for k, v in self.lora_state_dict(self.denoiser, pipe.transformer, adapter).items()
        }
        targets = flux_lora_targets(spec.target_modules)
        layers: dict[str, Any] = {
            "transformer_lora_layers": state,
            "transformer_lora_adapter_metadata": lora_config(spec, targets).to_dict(),
        }
        encoder = pipe.text_encoder
        if spec.train_text_encoders and getattr(encoder, "peft_config", None):
            layers["text_encoder_lora_layers"] = self.lora_state_dict("text_encoder", encoder, _single_adapter(encoder))
            layers["text_encoder_lora_adapter_metadata"] = lora_config(spec, TEXT_ENCODER_TARGETS).to_dict()
        target = out_dir / DIFFUSERS_WEIGHT_NAME
        with atomic_path(target) as temporary:
            FluxPipeline.save_lora_weights(temporary.parent, weight_name=temporary.name, **layers)
            if metadata:
                _add_header_metadata(temporary, metadata)
            canonicalize_safetensors(temporary)
        kohya = save_kohya_flux_lora(out_dir / KOHYA_FLUX_WEIGHT_NAME, state, float(spec.alpha), metadata)
        return {"diffusers": target, "kohya": kohya}

    # -- generation
    def render(self, pipe: Any, request: RenderRequest) -> Image.Image:
        """FluxPipeline from ``request.initial_latents`` packed (FLUX's flow starts at σ = 1 from them, unscaled).
        ``guidance_scale`` is the distilled guidance embedding; a negative prompt takes effect only through true
        classifier-free guidance, used only when asked (``true_cfg_scale`` > 1); otherwise it is not passed."""
        if request.height % 16 or request.width % 16:
            raise CastloraError(f"FLUX renders sides that are multiples of 16; got {request.width}x{request.height}.")
        latents = None
        if request.initial_latents is not None:
            latents = pack_latents(request.initial_latents)
        true_cfg = self.true_cfg_scale > 1 and bool(request.negative_prompt)
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt if true_cfg else None,
            true_cfg_scale=self.true_cfg_scale if true_cfg else 1.0,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=request.generator,
            latents=latents,
            max_sequence_length=self.max_sequence_length(pipe),
            joint_attention_kwargs={"scale": float(request.lora_scale)},
            output_type="pil",
        )
        return output.images[0]


def _single_adapter(module: torch.nn.Module) -> str:
    adapters = list(getattr(module, "peft_config", None) or {})
    if len(adapters) != 1:
        raise LoraError(f"{type(module).__name__} must hold exactly one LoRA adapter to export; it has {adapters}.")
    return adapters[0]


def _peft_named(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text encoder's ``lora_linear_layer.down/up`` naming as PEFT's ``lora_A/lora_B``."""
    return {
        key.replace(".lora_linear_layer.down.", ".lora_A.").replace(".lora_linear_layer.up.", ".lora_B."): value
        for key, value in state.items()
    }


def _linear_layer_named(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``_peft_named``: what ``load_text_encoder_lora`` reads."""
    return {
        key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): value
        for key, value in state.items()
    }


def _add_header_metadata(path: Path, extra: Mapping[str, str]) -> None:
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
    clashing = sorted(set(extra) & set(header))
    if clashing:
        raise LoraError(f"metadata keys {clashing} are reserved by the diffusers LoRA format; rename them.")
    save_file(load_file(str(path)), str(path), metadata={**header, **{str(k): str(v) for k, v in extra.items()}})


FLUX = FluxFamily()
