"""Tiny random-init DINOv2 and CLIP, built locally so D&C and the evaluation run offline in tests and the demo.

Same classes, processors and file layout as ``facebook/dinov2-base`` and ``openai/clip-vit-large-patch14`` after
``save_pretrained``, with every dimension shrunk. Embeddings are meaningless (random weights) but have the real
shapes and go through the real loading and preprocessing code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.models.tokenizers import write_tiny_clip_tokenizer

SEED = 0
DINOV2_CROP = 56
DINOV2_RESIZE = 64  # as the real processor: resize the short side a little above the crop, then centre-crop
DINOV2_PATCH = 14
CLIP_IMAGE_SIZE = 32
CLIP_PATCH = 8
CLIP_TEXT_POSITIONS = 32
CLIP_PROJECTION_DIM = 32

# DINOv2's processor normalises with ImageNet statistics (CLIP's processor keeps its own defaults).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_dinov2(target_dir: Path) -> None:
    """Random-init ``Dinov2Model`` (2 layers, 32 wide, 56 px / patch 14) + ``BitImageProcessor``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    target_dir = Path(target_dir)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=DINOV2_CROP,
        patch_size=DINOV2_PATCH,
    )
    torch.manual_seed(SEED)
    model = Dinov2Model(config).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": DINOV2_RESIZE},
        crop_size={"height": DINOV2_CROP, "width": DINOV2_CROP},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)


def build_tiny_clip(target_dir: Path) -> None:
    """Random-init ``CLIPModel`` (1-layer towers, projection 32) + ``CLIPProcessor`` with a local tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    target_dir = Path(target_dir)
    with tempfile.TemporaryDirectory(prefix="tiny-clip-vocab-") as vocab_dir:
        write_tiny_clip_tokenizer(Path(vocab_dir), model_max_length=CLIP_TEXT_POSITIONS)
        tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_TEXT_POSITIONS,
            # The text tower pools at the first end-of-text token, found by this id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": CLIP_IMAGE_SIZE,
            "patch_size": CLIP_PATCH,
        },
        projection_dim=CLIP_PROJECTION_DIM,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)
