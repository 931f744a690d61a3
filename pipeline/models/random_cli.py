"""The command line every full-size random-weight builder shares (``random_sdxl``, ``random_flux``): a new or
empty target folder, the weights' dtype and the device to initialise them on."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_builder(
    argv: Sequence[str] | None,
    description: str | None,
    build: Callable[[Path, torch.dtype, str], None],
    default_dtype: str,
    what: str,
) -> None:
    """Parse ``argv``, refuse a non-empty target folder, then ``build(target_dir, dtype, device)``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    args = parser.parse_args(argv)
    if args.target_dir.exists() and any(args.target_dir.iterdir()):
        raise SystemExit(f"{args.target_dir} is not empty; pass a new or empty directory.")
    build(args.target_dir, DTYPES[args.dtype], args.device)
    print(f"wrote a random-weight {what} pipeline to {args.target_dir}")
