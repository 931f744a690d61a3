import dagster as dg

from assets import pair_assets, quality_assets, training_assets
from assets.partitions import character_pairs

# Every castlora asset, in one list shared by the Definitions and the retraining schedule.
PAIR_ASSETS = dg.load_assets_from_modules([pair_assets, training_assets, quality_assets])

pair_job = dg.define_asset_job(
    "castlora_pair",
    selection=dg.AssetSelection.groups("castlora"),
    partitions_def=character_pairs,
    description="Every castlora asset for one character pair.",
)
