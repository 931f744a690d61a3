import dagster as dg

character_pairs = dg.DynamicPartitionsDefinition(name="character_pairs")
