"""verify_lora_file: a good file passes; truncated, tampered, unpaired, empty or NaN files are named and refused."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.lora.adapters import LoraError
from pipeline.lora.verify import verify_lora_file
from pipeline.storage.hashing import sha256_file


def _diffusers_state(modules: int = 3) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(modules):
        state[f"unet.block{i}.to_q.lora.down.weight"] = torch.randn(4, 16)
        state[f"unet.block{i}.to_q.lora.up.weight"] = torch.randn(16, 4)
    return state


def _kohya_state() -> dict[str, torch.Tensor]:
    return {
        "lora_unet_block0_to_q.lora_down.weight": torch.randn(4, 16),
        "lora_unet_block0_to_q.lora_up.weight": torch.randn(16, 4),
        "lora_unet_block0_to_q.alpha": torch.tensor(4.0),
    }


def test_good_files_pass_with_their_module_count(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file(_diffusers_state(3), path, metadata={"format": "pt"})
    report = verify_lora_file(path, "diffusers", sha256_file(path))
    assert (report.modules, report.tensors, report.metadata["format"]) == (3, 6, "pt")
    kohya = tmp_path / "k.safetensors"
    save_file(_kohya_state(), kohya)
    assert verify_lora_file(kohya, "kohya").modules == 1


def test_kohya_file_is_not_a_diffusers_lora(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(_kohya_state(), path)
    with pytest.raises(LoraError, match=r"no '\.lora\.down\.weight' tensors"):
        verify_lora_file(path, "diffusers")


def test_truncated_tampered_unpaired_and_nan_files_are_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file(_diffusers_state(), path)
    recorded = sha256_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match="cannot be read as safetensors"):
        verify_lora_file(path, "diffusers")
    with pytest.raises(LoraError, match="does not match the hash recorded"):
        verify_lora_file(path, "diffusers", recorded)

    state = _diffusers_state()
    del state["unet.block1.to_q.lora.up.weight"]
    save_file(state, path)
    with pytest.raises(LoraError, match=r"lack their down/up half, e\.g\. unet\.block1\.to_q"):
        verify_lora_file(path, "diffusers")

    state = _diffusers_state()
    state["unet.block2.to_q.lora.up.weight"][0, 0] = float("nan")
    save_file(state, path)
    with pytest.raises(LoraError, match="non-finite"):
        verify_lora_file(path, "diffusers")

    with pytest.raises(LoraError, match="does not exist"):
        verify_lora_file(tmp_path / "missing.safetensors", "kohya")
