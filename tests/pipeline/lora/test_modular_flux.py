"""Modular customization on tiny FLUX.1: character LoRA files in both formats (kohya with q/k/v fused) read to the
same deltas, gradient fusion beats the plain sum there too, and the merge exports in FLUX's formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline

from pipeline.families import family_for
from pipeline.lora import LoraSpec
from pipeline.lora.character_lora import load_character_lora
from pipeline.lora.merge import summed_deltas
from pipeline.lora.modular import ModularConfig, export_merged, merge_character_loras, merged_state
from pipeline.lora.versions import TrainingRun
from pipeline.models.tiny_flux import build_tiny_flux
from pipeline.storage.lineage import LineageRecorder


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("modular_flux")
    build_tiny_flux(root / "flux")

    def load() -> FluxPipeline:
        pipe = FluxPipeline.from_pretrained(root / "flux")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    files = []
    for seed in (1, 2):
        pipe = load()
        family = family_for(pipe)
        family.add_lora("transformer", pipe.transformer, LoraSpec(rank=4, alpha=2.0), "castlora")
        generator = torch.Generator().manual_seed(seed)
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.05
        files.append(family.export_lora(root / f"character{seed}", pipe, LoraSpec(rank=4, alpha=2.0)))
    yield SimpleNamespace(root=root, pipe=load(), files=files)
    torch.set_num_threads(previous)


def test_kohya_flux_file_reads_to_the_same_deltas_as_the_diffusers_file(flux):
    peft = load_character_lora(flux.pipe, flux.files[0]["diffusers"])
    kohya = load_character_lora(flux.pipe, flux.files[0]["kohya"])
    assert kohya.file_format == "kohya" and set(kohya.modules) == set(peft.modules)
    assert any(".attn.to_k" in name for name in kohya.modules)  # split out of the fused qkv
    for name, module in peft.modules.items():
        torch.testing.assert_close(kohya.modules[name].delta(), module.delta())


def test_gradient_fusion_merges_and_exports_on_flux(flux):
    characters = [
        SimpleNamespace(lora=str(flux.files[0]["kohya"]), lora_scale=1.0, token_phrase="olis dog"),
        SimpleNamespace(lora=str(flux.files[1]["diffusers"]), lora_scale=1.0, token_phrase="vrin cat"),
    ]
    merged, loras = merge_character_loras(flux.pipe, characters, ModularConfig(fusion_timesteps=1), 32)
    assert sum(merged.details["residual_fused"]) < sum(merged.details["residual_sum"])
    recorder = LineageRecorder(flux.root / "lineage", "run", "lora", "olis__vrin", "test")
    run = TrainingRun(flux.root / "lora", flux.root / "cache", recorder, "tiny:flux")
    record = export_merged(flux.pipe, merged, flux.root / "merged", run, "merged-test")
    assert set(record.files) == {"diffusers", "kohya"}
    back = load_character_lora(flux.pipe, record.files["kohya"])
    for name, module in merged.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), module.delta(), rtol=1e-4, atol=1e-6)
    spec, state = merged_state(flux.pipe, merged)
    assert spec.rank == 8 and all(key.startswith("transformer.") for key in state)
    assert not getattr(flux.pipe.transformer, "peft_config", None)  # every temporary adapter removed again
    assert set(summed_deltas(loras)) == set(merged.modules)
