"""``castlora`` command: register pairs and materialize them against the local Dagster instance.

The runs land in the same instance the UI reads (``$DAGSTER_HOME``, default ``<data home>/dagster_home``),
so everything the CLI does shows up in ``make ui``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import CastloraError
from pipeline.storage.paths import DataLayout, resolve_home

SAMPLE_PAIR = Path(__file__).resolve().parent.parent / "samples" / "dog6__dog2"


def _dagster_home(layout: DataLayout) -> Path:
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(layout.ensure(layout.home / "dagster_home"))
    return Path(os.environ["DAGSTER_HOME"])


def _instance(layout: DataLayout):
    import dagster as dg

    _dagster_home(layout)
    from assets.instance import ensure_instance

    # sqlite unless CASTLORA_POSTGRES_URL is set; GPU pool limit, run retries, telemetry off (assets/instance.py).
    ensure_instance(Path(os.environ["DAGSTER_HOME"]))
    return dg.DagsterInstance.get()


def register(folder: Path, layout: DataLayout) -> str:
    from assets.definitions import build_resources
    from assets.instance import instance_lock
    from assets.partitions import character_pairs
    from pipeline.spec import load_spec

    spec = load_spec(folder)
    # The storage resource registers locally and, with CASTLORA_S3_BUCKET set, publishes the spec too.
    storage = build_resources({**os.environ, "CASTLORA_HOME": str(layout.home)})["storage"]
    # One register at a time per instance: the instance (created on a fresh home) and the partition first,
    # the spec last, so a command that fails leaves the spec of the last one that succeeded.
    with instance_lock(_dagster_home(layout)):
        instance = _instance(layout)
        if not instance.has_dynamic_partition(character_pairs.name, spec.pair):
            instance.add_dynamic_partitions(character_pairs.name, [spec.pair])
        path = _write_spec(storage, spec, layout)
    print(f"registered pair {spec.pair!r} ({len(spec.characters)} characters) -> {path}")
    return spec.pair


def _write_spec(storage, spec, layout: DataLayout) -> Path:
    """``storage.register(spec)``; if it fails (publishing to S3), the spec that was in force is put back."""
    from pipeline.storage.atomic import write_text_atomic

    target = layout.spec_path(spec.pair)
    previous = target.read_text(encoding="utf-8") if target.is_file() else None
    try:
        return storage.register(spec)
    except BaseException:
        if previous is None:
            target.unlink(missing_ok=True)
        else:
            write_text_atomic(previous, target)
        raise


def materialize(pair: str, layout: DataLayout) -> bool:
    from assets.definitions import defs
    from assets.jobs import pair_job
    from assets.partitions import character_pairs
    from pipeline.storage.paths import validate_key

    validate_key(pair)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    instance = _instance(layout)
    if not instance.has_dynamic_partition(character_pairs.name, pair):
        raise CastloraError(
            f"Pair {pair!r} is not a partition of this Dagster instance ({os.environ['DAGSTER_HOME']}); "
            "run `castlora register <folder>` first."
        )
    job = defs.resolve_job_def(pair_job.name)
    # main() exported CASTLORA_HOME before assets.definitions was imported, so defs' storage points at it.
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        instance=instance,
        partition_key=pair,
        raise_on_error=False,
    )
    for event in result.get_asset_materialization_events():
        print(f"  materialized {event.asset_key.to_user_string():<14} [{pair}]")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        print(f"  check {evaluation.asset_check_key.name:<27} {verdict}")
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data:
            error = event.step_failure_data.user_failure_data or event.step_failure_data.error
            message = getattr(error, "description", None) or getattr(error, "message", "")
            print(f"  FAILED {event.step_key}: {message}", file=sys.stderr)
    return result.success


def summary(pair: str, layout: DataLayout) -> None:
    pair_dir = layout.pair_dir(pair)
    print(f"\nOutputs for {pair}: {pair_dir}")
    for stage in sorted(p for p in pair_dir.iterdir() if p.is_dir()):
        manifest = stage / "manifest.parquet"
        print(f"  {stage.name:<14} {manifest if manifest.is_file() else stage}")
    print(f"Lineage (Parquet): {layout.lineage}")
    query = f"select asset_key, count(*) from read_parquet('{layout.lineage}/**/*.parquet') group by 1"
    print(f'  e.g. .venv/bin/python -c "import duckdb; print(duckdb.sql(\\"{query}\\"))"')
    print(f"Dagster instance: {os.environ['DAGSTER_HOME']}")
    print("Open the UI with `make ui` (dagster dev on http://127.0.0.1:3000).")


def import_mudi_folder(source: Path, destination: Path, pair: str | None, class_nouns: list[str]) -> Path:
    from pipeline.mudi_import import import_mudi

    nouns = {}
    for item in class_nouns:
        cid, sep, noun = item.partition("=")
        if not sep or not cid.strip() or not noun.strip():
            raise CastloraError(f"--class-noun {item!r}: use ID=NOUN, e.g. --class-noun a=corgi.")
        nouns[cid.strip()] = noun.strip()
    spec_file = import_mudi(source, destination, pair, nouns)
    print(f"wrote {spec_file}; register it with `castlora register {destination}` or drop it into the inbox")
    return spec_file


def write_example_pair(destination: Path, layout: DataLayout) -> Path:
    from pipeline.lora.example_pair import write_example_lora_pair
    from pipeline.models.loading import ensure_tiny

    # The tiny SDXL the `tiny` preset loads (built into the data home's model cache on first use).
    spec_file = write_example_lora_pair(destination, ensure_tiny("sdxl", layout.models))
    print(f"wrote {spec_file}; register it with `castlora register {destination}` or drop it into the inbox")
    return spec_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="castlora", description=__doc__)
    parser.add_argument("--home", help="data home (default $CASTLORA_HOME or ./castlora_data)")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="validate a pair folder/spec and add it as a partition")
    reg.add_argument("folder", type=Path)
    mat = sub.add_parser("materialize", help="materialize every asset for a registered pair")
    mat.add_argument("pair")
    demo = sub.add_parser("demo", help="register the bundled sample pair and materialize it")
    demo.add_argument("--sample", type=Path, default=SAMPLE_PAIR)
    demo.add_argument(
        "--preset",
        help="model preset to run the pipeline with, e.g. tiny-flux (default $CASTLORA_PRESET or tiny, tiny SDXL)",
    )
    sub.add_parser("pairs", help="list registered pairs")
    mudi = sub.add_parser("import-mudi", help="turn a MuDI dataset folder (metadata.jsonl) into a pair folder")
    mudi.add_argument("source", type=Path, help="the MuDI folder: photos, masks, metadata.jsonl")
    mudi.add_argument("destination", type=Path, help="a new folder for the castlora pair (pair.yaml and files)")
    mudi.add_argument("--pair", help="pair key (default: from the folder name, a_and_b -> a__b)")
    mudi.add_argument(
        "--class-noun", action="append", default=[], metavar="ID=NOUN", help="class noun of a character (repeatable)"
    )
    example = sub.add_parser(
        "example-lora-pair",
        help="write a pair folder made only of two (random) character LoRA files for the tiny preset, to try "
        "modular customization",
    )
    example.add_argument("destination", type=Path, help="a new folder for the pair (pair.yaml, two LoRA files)")
    args = parser.parse_args(argv)

    layout = DataLayout(resolve_home(args.home))
    os.environ["CASTLORA_HOME"] = str(layout.home)
    # Progress bars from model loading drown the run summary; Dagster's own log carries progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command == "register":
            register(args.folder, layout)
        elif args.command == "materialize":
            ok = materialize(args.pair, layout)
            summary(args.pair, layout)
            return 0 if ok else 1
        elif args.command == "demo":
            if args.preset:
                from pipeline.models.presets import get_preset

                # Before assets.definitions is imported: its resources read the preset from the environment.
                os.environ["CASTLORA_PRESET"] = get_preset(args.preset).name
            pair = register(args.sample, layout)
            ok = materialize(pair, layout)
            summary(pair, layout)
            return 0 if ok else 1
        elif args.command == "import-mudi":
            import_mudi_folder(args.source, args.destination, args.pair, args.class_noun)
        elif args.command == "example-lora-pair":
            write_example_pair(args.destination, layout)
        elif args.command == "pairs":
            from pipeline.storage.registry import registered_pairs

            for key in registered_pairs(layout):
                print(key)
    except CastloraError as exc:
        print(f"castlora: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
