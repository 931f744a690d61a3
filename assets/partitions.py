import dagster as dg

from pipeline.storage.paths import validate_key

character_pairs = dg.DynamicPartitionsDefinition(name="character_pairs")

# Metadata key on each ``references`` materialization: the fingerprint of the spec and its photos' bytes.
REFERENCES_FINGERPRINT = "references_fingerprint"
# Metadata key on each ``evaluation`` materialization: the headline D&C metric and its value per variant.
DNC_HEADLINE = "dnc_headline"


def pair_key(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> str:
    """The run's character-pair key, refused (with the rule) if it could not be a safe folder name."""
    if not context.has_partition_key:
        raise dg.Failure("castlora assets and checks run per character pair: select a partition.")
    return validate_key(context.partition_key)


def latest_materializations(
    instance: dg.DagsterInstance, key: dg.AssetKey, pair: str, limit: int = 1
) -> list[dg.AssetMaterialization]:
    """The newest ``limit`` materializations of ``key`` for one pair, newest first."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pair]), limit=limit
    ).records
    return [record.asset_materialization for record in records]
