"""Tiny random-init YOLO-World and MobileSAM for the ultralytics backend, built locally (no download).

Same classes, same checkpoint formats and the same loading code as the real ``yolov8s-worldv2.pt`` /
``mobile_sam.pt``; outputs are meaningless. Each builder writes ``weights.pt`` plus an ``ultralytics.json``
sidecar (small inference size; SAM's architecture name, which ultralytics otherwise reads off the file name).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0
TINY_DETECTOR_IMGSZ = 160
TINY_SAM_IMGSZ = 256
TINY_SAM_CHECKPOINT_NAME = "mobile_sam.pt"
"""The smallest SAM ultralytics builds; its sizes are fixed in ultralytics' builder (about 10M parameters)."""
YOLO_WORLD_DEPTH = 0.33
YOLO_WORLD_WIDTH = 0.0625
"""Channels 8..64 instead of 32..512 (yolov8n-worldv2 uses width 0.25): about 0.2M parameters."""
TEXT_FEATURE_DIM = 512
"""YOLO-World's text feature size (CLIP ViT-B/32's projection); fixed by the model yaml's WorldDetect args."""


def build_tiny_yolo_world(target_dir: Path) -> None:
    """YOLO-World v2 from ultralytics' own yaml with tiny multipliers + a tiny CLIP text encoder beside it."""
    from pipeline.segment.ultra import SIDECAR_FILE, TEXT_ENCODER_DIR, WEIGHTS_FILE, import_ultralytics_offline

    import_ultralytics_offline()
    from ultralytics import YOLOWorld
    from ultralytics.utils import ROOT, YAML

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    architecture = YAML.load(ROOT / "cfg/models/v8/yolov8-worldv2.yaml")
    # Without "scales" the plain multipliers apply. The file name must not look like "yolov8n-..." either,
    # or ultralytics would pick a named scale from it.
    architecture.pop("scales", None)
    architecture.update(depth_multiple=YOLO_WORLD_DEPTH, width_multiple=YOLO_WORLD_WIDTH)
    yaml_path = target_dir / "tiny-yolo-world.yaml"
    YAML.save(yaml_path, architecture)

    torch.manual_seed(SEED)
    model = YOLOWorld(str(yaml_path))
    with torch.no_grad():
        # The contrastive heads start at bias -10 (scores ~5e-5); 0 gives scores near 0.5, so the default
        # detection threshold finds boxes and a tiny end-to-end run exercises the mask path.
        for head in model.model.model[-1].cv4:
            head.bias.fill_(0.0)
    model.save(target_dir / WEIGHTS_FILE)
    _write_tiny_clip_text_encoder(target_dir / TEXT_ENCODER_DIR)
    _write_sidecar(target_dir / SIDECAR_FILE, {"imgsz": TINY_DETECTOR_IMGSZ})


def build_tiny_ultralytics_sam(target_dir: Path) -> None:
    """Random-init MobileSAM from ultralytics' builder, saved as a (half-precision) state dict."""
    from pipeline.segment.ultra import SIDECAR_FILE, WEIGHTS_FILE, import_ultralytics_offline

    import_ultralytics_offline()
    from ultralytics.models.sam.build import sam_model_map

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = sam_model_map[TINY_SAM_CHECKPOINT_NAME]()  # no checkpoint: random init, nothing fetched
    state = {key: value.half() if value.is_floating_point() else value for key, value in model.state_dict().items()}
    torch.save(state, target_dir / WEIGHTS_FILE)
    _write_sidecar(
        target_dir / SIDECAR_FILE,
        {"imgsz": TINY_SAM_IMGSZ, "sam_checkpoint_name": TINY_SAM_CHECKPOINT_NAME},
    )


def _write_tiny_clip_text_encoder(target_dir: Path) -> None:
    """Random CLIP text tower whose projection has YOLO-World's 512 features, with a generated tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from pipeline.models.tokenizers import write_tiny_clip_tokenizer

    write_tiny_clip_tokenizer(target_dir)
    tokenizer = CLIPTokenizer.from_pretrained(target_dir)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_FEATURE_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    CLIPTextModelWithProjection(config).eval().save_pretrained(target_dir)


def _write_sidecar(path: Path, settings: dict[str, object]) -> None:
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
