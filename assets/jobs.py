import dagster as dg

from assets.partitions import character_pairs

pair_job = dg.define_asset_job(
    "castlora_pair",
    selection=dg.AssetSelection.groups("castlora"),
    partitions_def=character_pairs,
    description="Every castlora asset for one character pair.",
)
