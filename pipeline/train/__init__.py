"""DreamBooth-LoRA training for SDXL: config, content-keyed caches, data plan, resumable loop."""

from pipeline.train.config import TrainConfig
from pipeline.train.data import TrainingSample, build_samples, load_samples
from pipeline.train.loop import TrainResult, train_lora

__all__ = ["TrainConfig", "TrainResult", "TrainingSample", "build_samples", "load_samples", "train_lora"]
