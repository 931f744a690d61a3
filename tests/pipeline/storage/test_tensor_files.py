"""Byte-reproducible safetensors: the same tensors and metadata give the same file in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CastloraError
from pipeline.storage.tensor_files import canonicalize_safetensors

_WRITER = """
import json, sys, torch
from safetensors.torch import save_file
from pipeline.storage.tensor_files import canonicalize_safetensors
adapter = json.dumps({"r": 4, "target_modules": list({"to_q", "to_k", "to_v", "to_out.0", "add_k_proj"})})
meta = {f"key{i}": str(i) for i in range(12)} | {"format": "pt", "lora_adapter_metadata": adapter}
save_file({"b.lora_A.weight": torch.arange(6.).reshape(2, 3), "a.lora_B.weight": torch.ones(3, 2)}, sys.argv[1],
          metadata=meta)
if sys.argv[2] == "canonical":
    canonicalize_safetensors(sys.argv[1])
"""


def _write_in_subprocess(path: Path, seed: int, mode: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    subprocess.run([sys.executable, "-c", _WRITER, str(path), mode], check=True, env=env)
    return path.read_bytes()


def test_processes_write_the_same_bytes_once_canonical(tmp_path: Path) -> None:
    raw = {_write_in_subprocess(tmp_path / f"raw{seed}.safetensors", seed, "raw") for seed in range(4)}
    assert len(raw) > 1, "safetensors' header order no longer varies: this canonicalisation may be unnecessary"
    canonical = {_write_in_subprocess(tmp_path / f"c{seed}.safetensors", seed, "canonical") for seed in range(4)}
    assert len(canonical) == 1


def test_canonical_file_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    tensors = {"z.weight": torch.randn(3, 5), "a.weight": torch.randn(2, 2, dtype=torch.float16)}
    adapter = {"r": 4, "target_modules": ["to_v", "to_q", "to_k"], "rank_pattern": {"b": 2, "a": 1}}
    metadata = {"zeta": "1", "format": "pt", "lora_adapter_metadata": json.dumps(adapter), "alpha": "not {json"}
    save_file(tensors, str(path), metadata=metadata)
    canonicalize_safetensors(path)

    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]  # in file order
    assert list(header) == sorted(metadata)
    assert json.loads(header["lora_adapter_metadata"]) == {**adapter, "target_modules": ["to_k", "to_q", "to_v"]}
    assert header["alpha"] == "not {json" and header["zeta"] == "1"

    before = path.read_bytes()
    canonicalize_safetensors(path)
    assert path.read_bytes() == before  # idempotent
    assert int.from_bytes(before[:8], "little") % 8 == 0  # header stays 8-byte aligned, as safetensors writes it


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x01\x02", "shorter than"),
        ((10**6).to_bytes(8, "little") + b"{}", "beyond the file"),
        ((4).to_bytes(8, "little") + b"nope", "not JSON"),
    ],
)
def test_a_broken_file_is_named(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CastloraError, match=f"broken.safetensors.*{reason}"):
        canonicalize_safetensors(path)
