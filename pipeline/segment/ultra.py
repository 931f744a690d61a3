"""YOLO-World open-vocabulary boxes + ultralytics SAM masks: the optional second segmentation backend.

Everything loads from local files and nothing is ever downloaded. Two ultralytics habits need care:

* ``YOLOWorld.set_classes`` builds OpenAI CLIP ViT-B/32 (pip-installing the ``clip`` package and fetching its
  weights). We encode the class noun with the same network in transformers format instead
  (``openai/clip-vit-base-patch32``, local only) and set the embedding on the model the way ``set_classes`` does.
* Bare names such as ``yolov8s-worldv2.pt`` are downloaded when no such file exists, so every weight path is
  checked here first and only existing absolute paths reach ultralytics.

A model directory (what ``resolve_model`` returns for ``tiny:`` models) holds ``weights.pt``, optionally
``ultralytics.json`` (``imgsz``; for SAM ``sam_checkpoint_name``, the ultralytics file name that tells which
architecture the state dict belongs to) and, for YOLO-World, optionally ``text_encoder/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import CastloraError, ModelLoadError
from pipeline.images import to_rgb
from pipeline.models.loading import load_pretrained
from pipeline.segment.base import Detection, SegmentConfig, SegmentResult, detected, no_detection
from pipeline.segment.boxes import best_detection
from pipeline.segment.masks import clean_mask

LABEL = "yolo-world+sam (ultralytics)"
WEIGHTS_FILE = "weights.pt"
SIDECAR_FILE = "ultralytics.json"
TEXT_ENCODER_DIR = "text_encoder"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"
"""transformers twin of the ``clip:ViT-B/32`` text tower YOLO-World was trained with; read from the HF cache only."""
DEFAULT_DETECTOR_IMGSZ = 640
DEFAULT_SAM_IMGSZ = 1024
WEIGHT_SUFFIXES = (".pt", ".pth")

TEXT_ENCODER_HELP = (
    "YOLO-World needs CLIP ViT-B/32 text features for the class noun. ultralytics would download OpenAI CLIP "
    "(and pip-install the `clip` package) for that, which castlora never does. Provide the text encoder "
    f"locally instead: save {DEFAULT_TEXT_ENCODER!r} with save_pretrained into a folder named "
    f"{TEXT_ENCODER_DIR!r} next to the detector's {WEIGHTS_FILE}, pass text_encoder=<folder>, or have it in "
    "the local Hugging Face cache."
)


def import_ultralytics_offline() -> Any:
    """Import ultralytics with its network features off (update checks, telemetry, pip auto-installs).

    The environment switches must be set before the first import: ultralytics resolves DNS names at import
    time to decide whether it is online. If it was imported earlier while online, the flags it derived are
    turned off here.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"  # check_requirements would otherwise pip-install missing packages
    try:
        import ultralytics
    except ModuleNotFoundError as exc:
        raise CastloraError(
            "Segmentation backend 'ultralytics' needs the ultralytics package (a castlora dependency): "
            "`pip install 'ultralytics>=8.4'`, or choose backend 'owlv2_sam' or 'grabcut'."
        ) from exc
    import ultralytics.utils as ultralytics_utils
    from ultralytics.utils import checks, events

    if ultralytics_utils.ONLINE or checks.AUTOINSTALL:
        checks.ONLINE = False
        checks.AUTOINSTALL = False
        events.events.enabled = False
    _undo_pil_open_patch()
    return ultralytics


def _undo_pil_open_patch() -> None:
    """Give PIL its own ``Image.open`` back.

    ultralytics replaces it process-wide with a wrapper that, on an unreadable file, tries to install
    ``pi-heif`` and then fails with ModuleNotFoundError instead of PIL's UnidentifiedImageError, which breaks
    castlora's "this mask file is unreadable" errors. We pass ultralytics arrays, never files, so nothing of
    ours needs the wrapper.
    """
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original


def resolve_weights_file(source: str | Path, what: str) -> Path:
    """An existing ``.pt`` file: ``source`` itself, or ``weights.pt`` inside a directory."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{what}: weight file {path} does not exist. castlora never downloads weights: put the .pt file "
            f"there, or point the model preset at a directory containing {WEIGHTS_FILE}."
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{what}: {path} is not a PyTorch weight file (expected {' or '.join(WEIGHT_SUFFIXES)}).")
    return path.resolve()


def read_sidecar(weights_file: Path) -> dict[str, Any]:
    """``ultralytics.json`` settings that travel with a ``weights.pt`` (like a processor config in HF dirs)."""
    sidecar = weights_file.parent / SIDECAR_FILE
    if weights_file.name != WEIGHTS_FILE or not sidecar.is_file():
        return {}
    try:
        settings = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{sidecar} is not valid JSON: {exc}. Fix or delete it.") from exc
    if not isinstance(settings, dict):
        raise ModelLoadError(f"{sidecar} must hold a JSON object, found {type(settings).__name__}.")
    return settings


def sam_checkpoint_name(weights_file: Path, settings: dict[str, Any]) -> str:
    """The ultralytics SAM file name (e.g. ``mobile_sam.pt``) whose architecture the weights belong to.

    ultralytics picks the SAM architecture from the file name; a castlora ``weights.pt`` says it in its sidecar.
    """
    from ultralytics.models.sam.build import sam_model_map

    known = sorted(sam_model_map)
    name = settings.get("sam_checkpoint_name")
    if name is None:
        matches = [key for key in known if weights_file.name.endswith(key)]
        if not matches:
            raise ModelLoadError(
                f"SAM segmenter: cannot tell which SAM architecture {weights_file} holds. Keep the file name "
                f"ultralytics uses (one of {', '.join(known)}), or put weights.pt next to an {SIDECAR_FILE} "
                'with {"sam_checkpoint_name": "<one of those names>"}.'
            )
        name = max(matches, key=len)  # the most specific name when several keys are suffixes of it
    if name not in sam_model_map:
        raise ModelLoadError(
            f"SAM segmenter: {weights_file.parent / SIDECAR_FILE} names sam_checkpoint_name={name!r}; "
            f"ultralytics knows {', '.join(known)}."
        )
    return str(name)


def bgr_array(image: Image.Image) -> np.ndarray:
    """ultralytics reads numpy images as OpenCV BGR."""
    return np.ascontiguousarray(np.asarray(to_rgb(image))[:, :, ::-1])


class ClipTextEncoder:
    """CLIP text tower + projection in transformers format; L2-normalised features as YOLO-World expects."""

    def __init__(self, source: str, device: torch.device) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        what = "YOLO-World text encoder"
        try:
            self.tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, source, what, local_files_only=True)
            self.model = load_pretrained(
                CLIPTextModelWithProjection.from_pretrained, source, what, local_files_only=True
            )
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc} {TEXT_ENCODER_HELP}") from exc
        self.model.to(device).eval()
        self.device = device
        self.source = source

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model(**{key: value.to(self.device) for key, value in tokens.items()}).text_embeds
        return torch.nn.functional.normalize(features.float(), dim=-1)


def find_text_encoder(explicit: str | None, detector_weights: Path) -> str:
    """Explicit folder, else ``text_encoder/`` beside the weights, else the HF cache copy of CLIP ViT-B/32."""
    if explicit:
        path = Path(explicit).expanduser()
        if explicit.startswith(("/", "./", "../", "~")) and not path.is_dir():
            raise ModelLoadError(f"YOLO-World text encoder: folder {path} does not exist. {TEXT_ENCODER_HELP}")
        return str(path) if path.is_dir() else explicit
    beside = detector_weights.parent / TEXT_ENCODER_DIR
    return str(beside) if beside.is_dir() else DEFAULT_TEXT_ENCODER


def detection_class_text(class_noun: str) -> str:
    """YOLO-World's vocabulary entries are bare class names (its COCO names), not CLIP-style sentences."""
    return class_noun.strip()


class UltralyticsSegmenter:
    """Finds the class noun with YOLO-World, then asks ultralytics' SAM for a mask inside the best box."""

    label = LABEL

    def __init__(
        self,
        detector_weights: str,
        sam_weights: str,
        device: str = "cpu",
        config: SegmentConfig | None = None,
        text_encoder: str | None = None,
        detector_imgsz: int | None = None,
        sam_imgsz: int | None = None,
    ) -> None:
        import_ultralytics_offline()
        self.config = config or SegmentConfig()
        self.device = str(device)
        self.model_ids: tuple[str, ...] = (str(detector_weights), str(sam_weights))

        detector_file = resolve_weights_file(detector_weights, "YOLO-World detector")
        sam_file = resolve_weights_file(sam_weights, "SAM segmenter")
        detector_settings, sam_settings = read_sidecar(detector_file), read_sidecar(sam_file)
        self.detector_imgsz = int(detector_imgsz or detector_settings.get("imgsz", DEFAULT_DETECTOR_IMGSZ))
        self.sam_imgsz = int(sam_imgsz or sam_settings.get("imgsz", DEFAULT_SAM_IMGSZ))

        self.detector = _load_yolo_world(detector_file)
        self.text_encoder = ClipTextEncoder(find_text_encoder(text_encoder, detector_file), torch.device(self.device))
        expected_dim = int(self.detector.model.txt_feats.shape[-1])
        if self.text_encoder.dim != expected_dim:
            raise ModelLoadError(
                f"YOLO-World text encoder {self.text_encoder.source!r} makes {self.text_encoder.dim}-d features "
                f"but {detector_file} expects {expected_dim}-d. {TEXT_ENCODER_HELP}"
            )
        self.sam_predictor = _load_sam_predictor(sam_file, sam_settings, self.device, self.sam_imgsz)
        self._vocabulary: str | None = None
        self._embeddings: dict[str, torch.Tensor] = {}

    def segment(self, images: Sequence[Image.Image], class_noun: str) -> list[SegmentResult]:
        rgb_images = [to_rgb(image) for image in images]
        detections = self.detect(rgb_images, class_noun)
        results: list[SegmentResult] = []
        for image, detection in zip(rgb_images, detections, strict=True):
            if detection is None:
                results.append(no_detection(self.label))
                continue
            mask, mask_score = self.mask_for_box(image, detection.box)
            results.append(detected(detection, mask, mask_score, self.label, self.config))
        return results

    def detect(self, images: Sequence[Image.Image], class_noun: str) -> list[Detection | None]:
        """YOLO-World boxes in each image's own pixels, thresholded, class-agnostic NMS, best one kept."""
        if not images:
            return []
        self.set_vocabulary(detection_class_text(class_noun))
        threshold = self.config.detection_threshold
        found = self.detector.predict(
            [bgr_array(image) for image in images],
            conf=min(max(threshold, 0.0), 1.0),  # ultralytics only takes conf in [0, 1]; we filter again below
            iou=self.config.nms_iou,
            imgsz=self.detector_imgsz,
            device=self.device,
            verbose=False,
            save=False,
        )
        detections: list[Detection | None] = []
        for image, result in zip(images, found, strict=True):
            # result.boxes.xyxy is already mapped back through the letterbox into original-image pixels.
            boxes = result.boxes.xyxy.detach().float().cpu().numpy().reshape(-1, 4)
            scores = result.boxes.conf.detach().float().cpu().numpy().reshape(-1)
            keep = scores > threshold
            detections.append(best_detection(boxes[keep], scores[keep], image.width, image.height, self.config))
        return detections

    def set_vocabulary(self, class_text: str) -> None:
        """What ``WorldModel.set_classes`` does, with our local text encoder instead of a downloaded CLIP."""
        if class_text == self._vocabulary:
            return
        if class_text not in self._embeddings:
            self._embeddings[class_text] = self.text_encoder.encode([class_text])[0].cpu()
        world = self.detector.model
        parameter = next(world.parameters())
        world.txt_feats = self._embeddings[class_text].reshape(1, 1, -1).to(parameter.device, parameter.dtype)
        world.model[-1].nc = 1
        world.names = [class_text]
        self.detector.predictor = None  # a predictor runs a deep copy made at its set-up (old features, names)
        self._vocabulary = class_text

    @torch.inference_mode()
    def mask_for_box(
        self, image: Image.Image, box: tuple[float, float, float, float]
    ) -> tuple[np.ndarray, float | None]:
        """SAM prompted with one box in original-image pixels; the multimask candidate with the best score."""
        predictor = self.sam_predictor
        predictor.set_image(bgr_array(image))
        masks, rows = predictor.inference_features(
            predictor.features,
            src_shape=(image.height, image.width),
            bboxes=[list(box)],
            multimask_output=True,
        )
        predictor.reset_image()
        if masks is None or len(masks) == 0:
            return np.zeros((image.height, image.width), dtype=bool), None
        scores = rows[:, 4].float().cpu()
        best = int(torch.argmax(scores))
        mask = masks[best].cpu().numpy().astype(bool)
        mask = clean_mask(mask, self.config.fill_holes, self.config.keep_largest_component)
        return mask, float(scores[best])


def create_ultralytics_segmenter(
    *, detector_source: str, sam_source: str, device: str = "cpu", config: SegmentConfig | None = None
) -> UltralyticsSegmenter:
    """Entry point used by ``pipeline.segment.factory`` (its keyword names)."""
    return UltralyticsSegmenter(detector_source, sam_source, device=device, config=config)


def _load_yolo_world(weights_file: Path) -> Any:
    from ultralytics import YOLOWorld
    from ultralytics.nn.tasks import WorldModel

    try:
        model = YOLOWorld(str(weights_file))
    except Exception as exc:  # ultralytics raises TypeError/RuntimeError/UnpicklingError/... for bad files
        raise ModelLoadError(
            f"YOLO-World detector: could not load {weights_file}: {exc}. It must be an ultralytics YOLO-World "
            "checkpoint such as yolov8s-worldv2.pt."
        ) from exc
    if not isinstance(model.model, WorldModel):
        raise ModelLoadError(
            f"YOLO-World detector: {weights_file} holds a {type(model.model).__name__}, not a YOLO-World "
            "model. Check the ultralytics detector/sam settings of the model preset (are they swapped?)."
        )
    return model


def _load_sam_predictor(weights_file: Path, settings: dict[str, Any], device: str, imgsz: int) -> Any:
    """ultralytics' SAM builder for the named architecture + its predictor, set up on our model object."""
    from ultralytics.models.sam.build import sam_model_map
    from ultralytics.models.sam.predict import Predictor, SAM2Predictor

    name = sam_checkpoint_name(weights_file, settings)
    try:
        model = sam_model_map[name](str(weights_file))
    except Exception as exc:  # state-dict mismatches surface as RuntimeError, bad files as pickle errors
        raise ModelLoadError(
            f"SAM segmenter: could not load {weights_file} as ultralytics {name}: {exc}. Check that the file "
            "is that SAM checkpoint (or fix sam_checkpoint_name in its ultralytics.json)."
        ) from exc
    predictor_class = SAM2Predictor if name.startswith("sam2") else Predictor
    predictor = predictor_class(overrides={"imgsz": imgsz, "device": device, "verbose": False, "save": False})
    predictor.setup_model(model=model, verbose=False)
    return predictor
