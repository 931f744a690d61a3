"""Modular customization on the tiny SDXL: character LoRA files are read and checked against the base model, the
merge methods match their definitions, and a pair of two LoRA files and no photos runs through the stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.captions import CaptionCache
from pipeline.captions.template import TemplateCaptioner
from pipeline.errors import SpecError
from pipeline.images import IntakeConfig, mask_to_image
from pipeline.lora import LoraSpec, add_unet_lora, export_lora, lora_parameters
from pipeline.lora.adapters import LoraError
from pipeline.lora.character_lora import check_lora_file, load_character_lora
from pipeline.lora.merge import (
    capture_grams,
    concat_merge,
    fused_deltas,
    fusion_residuals,
    gradient_fusion_merge,
    sum_merge,
    summed_deltas,
)
from pipeline.lora.modular import (
    MODULAR_FILE,
    ModularConfig,
    denoiser_runner,
    merge_method,
    read_modular,
)
from pipeline.lora.record import LoraRecord, read_current
from pipeline.lora.versions import TrainingRun
from pipeline.models.tiny_sdxl import build_tiny_sdxl
from pipeline.segment import SegmentConfig
from pipeline.segmix.compose import SegMixConfig
from pipeline.spec import load_spec
from pipeline.stage_names import Stage
from pipeline.stages.captions import run_captions
from pipeline.stages.character_images import CharacterImagesConfig, run_character_images
from pipeline.stages.evaluation import VARIANTS, modular_variants
from pipeline.stages.lora import ValidationRenders, is_modular, run_modular
from pipeline.stages.references import run_references
from pipeline.stages.segments import run_segments
from pipeline.stages.segmix_bank import BankConfig, run_segmix_bank
from pipeline.storage.lineage import LineageRecorder
from pipeline.train import TrainConfig
from pipeline.train.training_set import load_samples

RANK = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(directory)
    return directory


@pytest.fixture(scope="module")
def pipe(tiny_dir, one_thread) -> StableDiffusionXLPipeline:
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _random_lora(unet: torch.nn.Module, out_dir: Path, seed: int, rank: int = RANK, alpha: float = 2.0) -> dict:
    """A character LoRA as a user would bring it: random weights on the U-Net's attention, saved in both formats."""
    add_unet_lora(unet, LoraSpec(rank=rank, alpha=alpha))
    generator = torch.Generator().manual_seed(seed)
    for param in lora_parameters(unet):
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    return export_lora(out_dir, unet, LoraSpec(rank=rank, alpha=alpha))


@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory, one_thread) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("character_loras")
    files = {}
    for name, seed in (("zorp", 1), ("quix", 2)):
        unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
        files[name] = _random_lora(unet, root / name, seed)
    return files


@pytest.fixture(scope="module")
def loras(pipe, lora_files):
    # One diffusers file and one kohya file: both formats are read into the same module layout.
    return [
        load_character_lora(pipe, lora_files["zorp"]["diffusers"]),
        load_character_lora(pipe, lora_files["quix"]["kohya"], scale=0.8),
    ]


# ---------------------------------------------------------------------------------------------- reading files
def test_both_formats_read_to_the_same_deltas(pipe, lora_files):
    peft = load_character_lora(pipe, lora_files["zorp"]["diffusers"])
    kohya = load_character_lora(pipe, lora_files["zorp"]["kohya"])
    assert (peft.file_format, kohya.file_format) == ("diffusers", "kohya")
    assert (peft.rank, peft.alpha) == (RANK, 2.0) and (kohya.rank, kohya.alpha) == (RANK, 2.0)
    assert set(peft.modules) == set(kohya.modules) and len(peft.modules) > 50
    for name, module in peft.modules.items():
        torch.testing.assert_close(module.delta(), kohya.modules[name].delta())
    info = check_lora_file(lora_files["quix"]["kohya"])
    assert (info.file_format, info.rank, info.alpha) == ("kohya", RANK, 2.0)


def test_kohya_names_in_diffusers_paths_read_too(pipe, lora_files, tmp_path):
    # Some trainers name kohya modules after the diffusers paths (lora_unet_down_blocks_1_…) instead of SGM's.
    renamed = {}
    for key, tensor in load_file(str(lora_files["zorp"]["diffusers"])).items():
        module, half = key.removeprefix("unet.").rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        renamed[f"{name}.lora_{half.split('.')[0]}.weight"] = tensor
        renamed[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "diffusers_named_kohya.safetensors"
    save_file(renamed, str(path))
    kohya = load_character_lora(pipe, path)
    peft = load_character_lora(pipe, lora_files["zorp"]["diffusers"])
    assert kohya.file_format == "kohya" and set(kohya.modules) == set(peft.modules)
    name = sorted(peft.modules)[-1]
    torch.testing.assert_close(kohya.modules[name].delta(), peft.modules[name].delta())


def test_a_lora_of_a_wider_model_is_refused_naming_file_and_first_mismatching_key(pipe, tiny_dir, tmp_path):
    config = dict(UNet2DConditionModel.load_config(tiny_dir, subfolder="unet"))
    config["block_out_channels"] = [32, 64, 96]  # the deepest level is wider than the pair's base model
    wider = UNet2DConditionModel.from_config(config)
    files = _random_lora(wider, tmp_path / "wider", seed=3)
    for kind in ("diffusers", "kohya"):
        with pytest.raises(LoraError) as caught:
            load_character_lora(pipe, files[kind])
        message = str(caught.value)
        assert str(files[kind]) in message
        # Sorted module order: down_blocks.1 matches, down_blocks.2 is the first that does not.
        assert "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight" in message
        assert "(4, 96)" in message and "needs (4, 64)" in message


def test_a_different_rank_layout_is_refused(pipe, lora_files, tmp_path):
    tensors = load_file(str(lora_files["zorp"]["diffusers"]))
    key = sorted(k for k in tensors if k.endswith("lora.up.weight"))[0]
    tensors[key] = torch.zeros(tensors[key].shape[0], RANK + 2)  # up of rank 6 against down of rank 4
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(LoraError, match=r"lora_B\.weight has shape \(\d+, 6\) but .* needs \(\d+, 4\)") as caught:
        load_character_lora(pipe, broken)
    assert str(broken) in str(caught.value)


def test_a_file_without_lora_weights_is_refused(tmp_path):
    path = tmp_path / "not_a_lora.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match="holds no LoRA weights"):
        check_lora_file(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        check_lora_file(garbage)


# ---------------------------------------------------------------------------------------------------- merging
def test_concat_is_exactly_the_sum_of_the_deltas_at_twice_the_rank(loras):
    merged = concat_merge(loras)
    expected = summed_deltas(loras)
    assert merged.rank == 2 * RANK
    for name, module in merged.modules.items():
        assert module.alpha == module.rank  # scales folded into the weights
        torch.testing.assert_close(module.delta(), expected[name], rtol=1e-5, atol=1e-6)
    # The 0.8 scale of the second LoRA is in the sum.
    name = next(iter(expected))
    manual = loras[0].modules[name].delta() + 0.8 * loras[1].modules[name].delta()
    torch.testing.assert_close(expected[name], manual)


def test_sum_is_the_best_rank_r_approximation_of_the_summed_delta(loras):
    merged = sum_merge(loras)
    assert merged.rank == RANK
    expected = summed_deltas(loras)
    name = next(iter(expected))
    singular = torch.linalg.svdvals(expected[name].double())
    error = torch.linalg.matrix_norm(merged.modules[name].delta().double() - expected[name].double())
    # Eckart-Young: the error of the best rank-r approximation is the norm of the discarded singular values.
    torch.testing.assert_close(error, singular[RANK:].norm(), rtol=1e-4, atol=1e-6)
    assert 0 < merged.details["min_energy_kept"] <= 1


@pytest.fixture(scope="module")
def grams(pipe, loras):
    denoiser = pipe.unet
    return [
        capture_grams(denoiser, lora, denoiser_runner(pipe, [f"a photo of {phrase}"], 64, timesteps=2))
        for lora, phrase in zip(loras, ("zorp ball", "quix ball"), strict=True)
    ]


def test_gradient_fusion_reproduces_each_lora_on_its_own_features_better_than_sum(pipe, loras, grams):
    assert not getattr(pipe.unet, "peft_config", None)  # the capture adapter is removed again
    assert set(grams[0]) == set(loras[0].modules)
    fused = fused_deltas(loras, grams)
    plain = summed_deltas(loras)
    fused_residual = fusion_residuals(fused, loras, grams)
    sum_residual = fusion_residuals(plain, loras, grams)
    assert sum(fused_residual) < 0.7 * sum(sum_residual)
    # It is the least-squares optimum: moving the fused delta towards the sum only makes it worse.
    halfway = {k: 0.5 * (fused[k] + plain[k]) for k in fused}
    assert sum(fused_residual) < sum(fusion_residuals(halfway, loras, grams)) < sum(sum_residual)
    stored = gradient_fusion_merge(loras, grams)
    assert stored.rank == 2 * RANK and stored.details["residual_fused"][0] < stored.details["residual_sum"][0]
    assert json.loads(stored.metadata()["castlora_merge_sources"])[1]["sha256"] == loras[1].sha256


# ------------------------------------------------------------------------------------------------------ specs
def _write_spec(folder: Path, characters: str) -> Path:
    (folder / "pair.yaml").write_text(f"pair: zorp__quix\ncharacters:\n{characters}", encoding="utf-8")
    return folder


def test_a_spec_with_lora_files_and_no_photos_parses(tmp_path, lora_files):
    for name in ("zorp", "quix"):
        (tmp_path / f"{name}.safetensors").write_bytes(Path(lora_files[name]["diffusers"]).read_bytes())
    spec = load_spec(
        _write_spec(
            tmp_path,
            "  - {id: zorp, class_noun: ball, token_phrase: zorp ball, lora: zorp.safetensors}\n"
            "  - {id: quix, class_noun: ball, token_phrase: quix ball, lora: quix.safetensors, lora_scale: '0.7'}\n",
        ),
        confine=True,
    )
    assert [c.photos for c in spec.characters] == [(), ()]
    assert spec.characters[0].lora == str((tmp_path / "zorp.safetensors").resolve())
    assert [c.lora_scale for c in spec.characters] == [1.0, 0.7]
    assert is_modular(spec.characters)
    assert type(spec).from_json(spec.to_json()) == spec


def test_a_character_with_neither_photos_nor_lora_is_refused_by_name(tmp_path, lora_files):
    (tmp_path / "zorp.safetensors").write_bytes(Path(lora_files["zorp"]["diffusers"]).read_bytes())
    with pytest.raises(SpecError, match=r"character 'quix'.*'photos'.*'lora'"):
        load_spec(
            _write_spec(
                tmp_path,
                "  - {id: zorp, class_noun: ball, token_phrase: zorp ball, lora: zorp.safetensors}\n"
                "  - {id: quix, class_noun: ball, token_phrase: quix ball}\n",
            )
        )


def test_a_missing_or_broken_lora_file_is_refused_at_spec_load(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    with pytest.raises(SpecError, match=r"characters\[0\]\.lora: LoRA file .* does not exist"):
        load_spec(
            _write_spec(
                tmp_path,
                "  - {id: a, class_noun: ball, token_phrase: a ball, lora: gone.safetensors}\n"
                "  - {id: b, class_noun: ball, token_phrase: b ball, lora: gone.safetensors}\n",
            )
        )
    with pytest.raises(SpecError, match=r"characters\[0\]\.lora: .*not a readable safetensors file"):
        load_spec(
            _write_spec(
                tmp_path,
                "  - {id: a, class_noun: ball, token_phrase: a ball, lora: broken.safetensors}\n"
                "  - {id: b, class_noun: ball, token_phrase: b ball, lora: broken.safetensors}\n",
            )
        )


def test_an_inbox_spec_may_not_name_a_lora_outside_its_folder(tmp_path, lora_files):
    folder = tmp_path / "pair"
    folder.mkdir()
    outside = lora_files["zorp"]["diffusers"]
    with pytest.raises(SpecError, match="points outside the pair folder"):
        load_spec(
            _write_spec(
                folder,
                f"  - {{id: a, class_noun: ball, token_phrase: a ball, lora: '{outside}'}}\n"
                f"  - {{id: b, class_noun: ball, token_phrase: b ball, lora: '{outside}'}}\n",
            ),
            confine=True,
        )


# ----------------------------------------------------------------------------------------------- the whole path
def _recorder(root: Path, asset: str) -> LineageRecorder:
    return LineageRecorder(root / "lineage", "run", asset, "zorp__quix", "test")


def test_a_pair_of_two_lora_files_runs_through_the_stages(tmp_path, tiny_dir, pipe, lora_files, one_thread):
    folder = tmp_path / "inbox" / "zorp__quix"
    folder.mkdir(parents=True)
    (folder / "zorp.safetensors").write_bytes(Path(lora_files["zorp"]["kohya"]).read_bytes())
    (folder / "quix.safetensors").write_bytes(Path(lora_files["quix"]["diffusers"]).read_bytes())
    count = 3
    for cid in ("zorp", "quix"):  # user masks for the rendered images (named like them): no segmenter needed
        masks = folder / f"{cid}_masks"
        masks.mkdir()
        for k in range(count):
            mask = np.zeros((64, 64), bool)
            mask[8:56, 12:52] = True
            mask_to_image(mask).save(masks / f"{cid}_{k:04d}.png")
    spec = load_spec(
        _write_spec(
            folder,
            "  - {id: zorp, class_noun: ball, token_phrase: zorp ball, lora: zorp.safetensors, masks: zorp_masks}\n"
            "  - {id: quix, class_noun: ball, token_phrase: quix ball, lora: quix.safetensors, masks: quix_masks}\n",
        ),
        confine=True,
    )
    pair_dir = tmp_path / "home" / "pairs" / "zorp__quix"

    def factory() -> StableDiffusionXLPipeline:
        loaded = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    generated = run_character_images(
        spec=spec,
        load_pipeline=factory,
        config=CharacterImagesConfig(images_per_character=count, steps=1, resolution=64),
        out_dir=pair_dir / Stage.CHARACTER_IMAGES,
        recorder=(images_recorder := _recorder(tmp_path, "character_images")),
        base_model_id="tiny",
    )
    assert generated.groupby("character_id").size().to_dict() == {"zorp": count, "quix": count}
    lora_shas = {c.id: load_character_lora(pipe, c.lora).sha256 for c in spec.characters}
    assert dict(zip(generated["character_id"], generated["lora_sha256"], strict=True)) == lora_shas
    rows = {row["artifact_sha256"]: row for row in images_recorder.rows}
    for record in generated.itertuples():  # lineage: generated, with the LoRA file as parent
        row = rows[record.sha256]
        assert row["parent_sha256s"] == [record.lora_sha256] and json.loads(row["params_json"])["generated"]

    refs = run_references(
        spec=spec,
        out_dir=pair_dir / Stage.REFERENCES,
        config=IntakeConfig(min_side=64),
        recorder=(references_recorder := _recorder(tmp_path, "references")),
        generated=generated,
    ).manifest
    assert len(refs) == 2 * count and set(refs["origin"]) == {"generated"}
    for row in references_recorder.rows:  # each reference's parent is a rendered image, whose parent is the LoRA
        character = json.loads(row["params_json"])["character_id"]
        (image_sha,) = row["parent_sha256s"]
        assert rows[image_sha]["parent_sha256s"] == [lora_shas[character]]
    segments = run_segments(
        references=refs,
        masks_dirs={c.id: c.masks_dir for c in spec.characters},
        out_dir=pair_dir / Stage.SEGMENTS,
        load_segmenter=lambda: pytest.fail("user masks cover every image"),
        config=SegmentConfig(),
        recorder=_recorder(tmp_path, "segments"),
        model_ids=[],
        confine_to=spec.confined_to,
    )
    assert set(segments["status"]) == {"ok"}
    run_captions(
        references=refs,
        out_dir=pair_dir / Stage.CAPTIONS,
        captioner=TemplateCaptioner(),
        cache=CaptionCache(tmp_path / "cache" / "captions"),
        recorder=_recorder(tmp_path, "captions"),
    )
    run_segmix_bank(
        segments=segments,
        class_images=None,
        character_nouns={c.id: c.class_noun for c in spec.characters},
        out_dir=pair_dir / Stage.SEGMIX_BANK,
        config=BankConfig(n_instance=3, n_prior=0, segmix=SegMixConfig(canvas=(64, 64))),
        recorder=_recorder(tmp_path, "segmix_bank"),
    )
    samples = load_samples(pair_dir, with_prior=False)
    assert {s.kind for s in samples} >= {"instance", "segmix"}

    lora_root = pair_dir / Stage.LORA
    recorder = _recorder(tmp_path, "lora")
    train = TrainConfig(
        steps=30, rank=8, alpha=8.0, resolution=64, mixed_precision="no", checkpoint_every=2, prior_weight=0.0
    )
    out = run_modular(
        pipe_factory=factory,
        characters=spec.characters,
        samples=samples,
        config=train,
        modular=ModularConfig(merge_method="gradient_fusion", fusion_timesteps=1, finetune_steps=2),
        run=TrainingRun(lora_root, tmp_path / "cache" / "train", recorder, "tiny"),
        validation=ValidationRenders(),
    )
    # The fine-tune is the pair's LoRA: the merge's shape, the modular step count and the KL term towards it.
    current = read_current(lora_root, Stage.LORA)
    assert current.version == out.finetuned.version and current.steps == 2
    trained_with = current.train_config()
    assert trained_with.kl_weight == 1.0 and trained_with.rank == 2 * RANK and not trained_with.train_text_encoder
    for kind in ("diffusers", "kohya"):
        assert current.files[kind].is_file() and out.merged.files[kind].is_file()
    # The merge records its method and sources in the file header.
    with safe_open(str(out.merged.files["diffusers"]), "pt") as handle:
        header = handle.metadata()
    assert header["castlora_merge_method"] == "gradient_fusion"
    assert {s["sha256"] for s in json.loads(header["castlora_merge_sources"])} == set(lora_shas.values())
    modular = read_modular(lora_root)
    assert modular is not None and (lora_root / MODULAR_FILE).is_file()
    assert modular["merged"].diffusers == out.merged.files["diffusers"]
    # The naive merge file loads back as both LoRAs at once.
    naive = load_character_lora(pipe, modular["naive_merge"].diffusers)
    expected = summed_deltas([load_character_lora(pipe, c.lora) for c in spec.characters])
    name = next(iter(expected))
    torch.testing.assert_close(naive.modules[name].delta(), expected[name], rtol=1e-4, atol=1e-6)
    # Lineage: the merged files have the character LoRAs as parents.
    merged_rows = [r for r in recorder.rows if r["artifact_sha256"] == out.merged.sha256["diffusers"]]
    assert set(merged_rows[0]["parent_sha256s"]) == set(lora_shas.values())
    # The evaluation's modular variants: naive merge, merge, and the fine-tuned merge (the pair's LoRA).
    variants, notes = modular_variants(VARIANTS, modular, current, merge_method(lora_root))
    assert [(v.name, v.lora.version) for v in variants] == [
        ("naive_merge", modular["naive_merge"].version),
        ("merged", out.merged.version),
        ("merged_segmix", current.version),
    ]
    assert not notes and "gradient_fusion" in variants[1].note


def test_modular_variants_are_skipped_with_a_note_for_a_pair_of_photos(tmp_path):
    record = LoraRecord(
        "lora-x", {"diffusers": tmp_path / "a", "kohya": tmp_path / "b"}, {"diffusers": "", "kohya": ""}
    )
    variants, notes = modular_variants(("segmix", "merged", "merged_segmix"), None, record)
    assert variants == [] and notes == ["merged, merged_segmix: skipped (only for pairs given as character LoRA files)"]
    assert modular_variants(("segmix",), None, record) == ([], [])
