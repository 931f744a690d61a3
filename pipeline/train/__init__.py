"""DreamBooth-LoRA training for any model family (docs/design.md#model-families): config, content-keyed caches,
data plan, trainer and its resumable loop, losses, runtime, Diffusion-DPO."""

from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample
from pipeline.train.loop import TrainResult, train_lora
from pipeline.train.preference import PreferencePair, train_preference

__all__ = [
    "PreferencePair",
    "TrainConfig",
    "TrainResult",
    "TrainingSample",
    "train_lora",
    "train_preference",
]
