"""Tiny random-init OWLv2 and SAM, built locally so tests and the offline demo never download weights.

The configs keep the real architectures (same classes, same processors, same file layout after
``save_pretrained``) but shrink every dimension so a forward pass on CPU takes milliseconds. Outputs are
meaningless; shapes, coordinate conventions and the loading code path are the real ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.models.tokenizers import write_tiny_clip_tokenizer

SEED = 0
OWLV2_IMAGE_SIZE = 64
OWLV2_PATCH_SIZE = 8
OWLV2_TEXT_POSITIONS = 16  # same as the real OWLv2 text tower: queries are short
SAM_IMAGE_SIZE = 128
SAM_PATCH_SIZE = 16

PAD_TOKEN = "!"  # OWLv2's tokenizer pads with "!" (id 0), not with the end-of-text token


def build_tiny_owlv2(target_dir: Path) -> None:
    """Random-init ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` saved to ``target_dir``."""
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    target_dir = Path(target_dir)
    with tempfile.TemporaryDirectory(prefix="tiny-clip-vocab-") as vocab_dir:
        # The end-of-text token has the highest id on purpose: OWLv2's text tower pools at input_ids.argmax().
        write_tiny_clip_tokenizer(Path(vocab_dir), model_max_length=OWLV2_TEXT_POSITIONS, pad_token=PAD_TOKEN)
        tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)
    vocab_size, bos_id, eos_id = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id

    config = Owlv2Config(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": OWLV2_TEXT_POSITIONS,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": OWLV2_IMAGE_SIZE,
            "patch_size": OWLV2_PATCH_SIZE,
        },
        projection_dim=32,
    )
    torch.manual_seed(SEED)
    model = Owlv2ForObjectDetection(config).eval()
    # The random box head's outputs are huge and saturate the sigmoid into zero-area boxes. With its last
    # layer zeroed every patch predicts its own grid cell (OWLv2's box bias), so callers see sane boxes.
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    image_processor = Owlv2ImageProcessor(size={"height": OWLV2_IMAGE_SIZE, "width": OWLV2_IMAGE_SIZE})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)


def build_tiny_sam(target_dir: Path) -> None:
    """Random-init ``SamModel`` + ``SamProcessor`` (128 px input, 8x8 embedding, 32x32 low-res masks)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    target_dir = Path(target_dir)
    hidden = 32
    embedding_side = SAM_IMAGE_SIZE // SAM_PATCH_SIZE
    config = SamConfig(
        vision_config={
            "hidden_size": hidden,
            "output_channels": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SAM_IMAGE_SIZE,
            "patch_size": SAM_PATCH_SIZE,
            "window_size": 4,
            "global_attn_indexes": [1],
            "num_pos_feats": hidden // 2,
            "mlp_dim": 64,
        },
        prompt_encoder_config={
            "hidden_size": hidden,
            "image_size": SAM_IMAGE_SIZE,
            "patch_size": SAM_PATCH_SIZE,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": hidden,
        },
    )
    torch.manual_seed(SEED)
    model = SamModel(config).eval()
    mask_side = embedding_side * 4  # SAM's mask decoder upsamples the embedding 4x
    image_processor = SamImageProcessor(
        size={"longest_edge": SAM_IMAGE_SIZE},
        pad_size={"height": SAM_IMAGE_SIZE, "width": SAM_IMAGE_SIZE},
        mask_size={"longest_edge": mask_side},
        mask_pad_size={"height": mask_side, "width": mask_side},
    )
    processor = SamProcessor(image_processor=image_processor)
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)
