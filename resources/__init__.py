"""Dagster resources: every external system (disk/S3, models, captioning APIs) is reached through one."""

from resources.captioner import CaptionerResource
from resources.models import ModelResource
from resources.storage import StorageResource

__all__ = ["CaptionerResource", "ModelResource", "StorageResource"]
