"""dnc_not_regressed compares the latest evaluation's headline D&C per variant with the previous one's."""

import dagster as dg
import pytest

from assets import checks
from assets.definitions import build_resources
from assets.jobs import PAIR_ASSETS
from assets.partitions import DNC_HEADLINE, character_pairs

PAIR = "red__blue"


def _evaluated(instance, metric: str, values: dict[str, float]) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="evaluation",
            partition=PAIR,
            metadata={DNC_HEADLINE: dg.MetadataValue.json({"metric": metric, "values": values})},
        )
    )


@pytest.fixture(scope="module")
def check_job(tmp_path_factory):
    job = dg.define_asset_job(
        "dnc_check", selection=dg.AssetSelection.checks(checks.dnc_not_regressed), partitions_def=character_pairs
    )
    home = tmp_path_factory.mktemp("home")
    defs = dg.Definitions(
        assets=PAIR_ASSETS,
        asset_checks=[checks.dnc_not_regressed],
        jobs=[job],
        resources=build_resources({"CASTLORA_HOME": str(home)}),
    )
    return defs.resolve_job_def("dnc_check")


def _check(instance, job) -> dg.AssetCheckEvaluation:
    # A checks-only job has no asset to carry the partitions definition, so the partition goes in as a run tag.
    result = job.execute_in_process(instance=instance, tags={"dagster/partition": PAIR})
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(character_pairs.name, [PAIR])
        yield instance


def test_first_evaluation_has_nothing_to_compare(instance, check_job):
    _evaluated(instance, "dnc_default:dinov2", {"segmix": 0.5})
    result = _check(instance, check_job)
    assert result.passed and "nothing to compare" in result.description


def test_drop_beyond_tolerance_fails_and_names_the_variant(instance, check_job):
    _evaluated(instance, "dnc_default:dinov2", {"segmix": 0.60, "iterative": 0.70})
    _evaluated(instance, "dnc_default:dinov2", {"segmix": 0.58, "iterative": 0.40})
    result = _check(instance, check_job)
    assert not result.passed
    assert "['iterative']" in result.description and "0.3" in result.description


def test_small_drop_or_gain_passes_and_other_metric_is_not_compared(instance, check_job):
    _evaluated(instance, "dnc_default:dinov2", {"segmix": 0.60})
    _evaluated(instance, "dnc_default:dinov2", {"segmix": 0.57})
    assert _check(instance, check_job).passed
    _evaluated(instance, "dnc_default:clip", {"segmix": 0.10})  # a different embedder: not comparable
    assert _check(instance, check_job).passed


def test_evaluation_without_dnc_value_fails(instance, check_job):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="evaluation", partition=PAIR))
    result = _check(instance, check_job)
    assert not result.passed and "no D&C value" in result.description
