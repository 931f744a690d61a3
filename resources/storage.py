"""Where artifacts, manifests and lineage live (local disk today; S3 arrives with the operations work)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

import pipeline
from pipeline.lineage import LineageRecorder
from pipeline.paths import DataLayout
from pipeline.registry import load_registered
from pipeline.spec import PairSpec


class StorageResource(dg.ConfigurableResource):
    """The data home. Empty ``home`` means ``$CASTLORA_HOME``, else ``./castlora_data``."""

    home: str = ""

    @property
    def layout(self) -> DataLayout:
        return DataLayout.at(self.home or None)

    def stage_dir(self, pair_key: str, stage: str) -> Path:
        return self.layout.ensure(self.layout.stage_dir(pair_key, stage))

    def spec(self, pair_key: str) -> PairSpec:
        return load_registered(self.layout, pair_key)

    def recorder(self, context: dg.AssetExecutionContext) -> LineageRecorder:
        """Lineage for the running asset; its code version is the one declared on the asset."""
        code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or "unversioned"
        return LineageRecorder(
            root=self.layout.lineage,
            run_id=context.run.run_id,
            asset_key=context.asset_key.to_user_string(),
            partition_key=context.partition_key,
            code_version=f"castlora-{pipeline.__version__}/{code_version}",
        )
