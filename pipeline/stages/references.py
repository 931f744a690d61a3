"""Stage 1: reference photos → normalised PNGs per character, with every rejected file and its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from pipeline.errors import NotEnoughReferencesError
from pipeline.images import IntakeConfig, intake_photos, save_png
from pipeline.spec import PairSpec
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest

REJECTED_NAME = "rejected.parquet"


@dataclass
class ReferencesOutput:
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    manifest_path: Path


def run_references(
    *,
    spec: PairSpec,
    out_dir: Path,
    config: IntakeConfig,
    recorder: LineageRecorder,
    generated: pd.DataFrame | None = None,
) -> ReferencesOutput:
    """Validate every character's photos; fail (writing nothing) if any character has too few usable ones.

    ``generated``: the ``character_images`` manifest; those images (rendered with a character's own LoRA) are
    taken in after the character's photos, and their rows say ``origin = generated``."""
    rendered: dict[str, list[str]] = {}
    if generated is not None:
        for row in generated.itertuples():
            rendered.setdefault(str(row.character_id), []).append(str(row.path))
    generated_paths = {p for paths in rendered.values() for p in paths}
    intakes = {
        character.id: intake_photos([*character.photos, *rendered.get(character.id, [])], config)
        for character in spec.characters
    }
    short = [cid for cid, result in intakes.items() if len(result.accepted) < config.min_photos]
    if short:
        details = []
        for cid in short:
            result = intakes[cid]
            rejected = ", ".join(f"{Path(r.source).name} ({r.reason})" for r in result.rejected) or "none"
            details.append(f"{cid!r}: {len(result.accepted)} usable, rejected: {rejected}")
        raise NotEnoughReferencesError(
            f"Pair {spec.pair!r}: at least {config.min_photos} usable photos are needed per character. "
            + "; ".join(details)
            + ". Fix or add photos (see the spec's 'photos' folders), render more character_images for a "
            "character given as a LoRA, or lower min_photos."
        )

    rows, rejected_rows, written = [], [], set()
    for character in spec.characters:
        result = intakes[character.id]
        for photo in result.accepted:
            path = out_dir / character.id / f"{photo.pixel_sha256[:16]}.png"
            sha = save_png(photo.image, path)
            written.add(path)
            rows.append(
                {
                    "character_id": character.id,
                    "class_noun": character.class_noun,
                    "token_phrase": character.token_phrase,
                    "path": str(path),
                    "sha256": sha,
                    "pixel_sha256": photo.pixel_sha256,
                    "source": photo.source,
                    "origin": "generated" if photo.source in generated_paths else "photo",
                    "source_sha256": photo.source_sha256,
                    "width": photo.image.width,
                    "height": photo.image.height,
                    "original_width": photo.original_size[0],
                    "original_height": photo.original_size[1],
                }
            )
            recorder.record(
                path,
                sha,
                parent_sha256s=[photo.source_sha256],
                params={
                    "source": photo.source,
                    "character_id": character.id,
                    "generated": photo.source in generated_paths,
                    **asdict(config),
                },
            )
        rejected_rows.extend(
            {"character_id": character.id, "source": r.source, "reason": r.reason} for r in result.rejected
        )

    manifest = pd.DataFrame(rows)
    rejected = pd.DataFrame(rejected_rows, columns=["character_id", "source", "reason"])
    manifest_path = write_manifest(manifest, out_dir)
    write_manifest(rejected, out_dir, REJECTED_NAME)
    prune_unlisted(out_dir, written)
    return ReferencesOutput(manifest=manifest, rejected=rejected, manifest_path=manifest_path)
