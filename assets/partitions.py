import dagster as dg

character_pairs = dg.DynamicPartitionsDefinition(name="character_pairs")

# Metadata key on each ``references`` materialization: the fingerprint of the spec and its photos' bytes.
REFERENCES_FINGERPRINT = "references_fingerprint"
# Metadata key on each ``evaluation`` materialization: the headline D&C metric and its value per variant.
DNC_HEADLINE = "dnc_headline"


def latest_materializations(
    instance: dg.DagsterInstance, key: dg.AssetKey, pair: str, limit: int = 1
) -> list[dg.AssetMaterialization]:
    """The newest ``limit`` materializations of ``key`` for one pair, newest first."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pair]), limit=limit
    ).records
    return [record.asset_materialization for record in records]
