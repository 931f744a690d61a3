"""Seg-Mix subjects read from stage manifests: the characters' cut-outs and the class images' cut-outs.

Used to build the Seg-Mix bank for training and the layouts MuDI's initialization renders from, so both draw
from the same usable cut-outs.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
from PIL import Image

from pipeline.segment import STATUS_OK
from pipeline.segmix.compose import SegMixSubject


def _load_cutout(path: str) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGBA")


def instance_subjects(segments: pd.DataFrame) -> dict[str, list[SegMixSubject]]:
    """Usable cut-outs per character (segments manifest), under the characters' token phrases."""
    subjects: dict[str, list[SegMixSubject]] = defaultdict(list)
    for row in segments[segments["status"] == STATUS_OK].to_dict("records"):
        subjects[row["character_id"]].append(
            SegMixSubject(
                _load_cutout(row["cutout_path"]),
                row["token_phrase"],
                row["character_id"],
                row["cutout_sha256"],
            )
        )
    return dict(subjects)


def prior_subjects(class_images: pd.DataFrame, character_nouns: dict[str, str]) -> dict[str, list[SegMixSubject]]:
    """Class cut-outs per character slot; characters sharing a class noun split its pool so that one
    prior composite never shows the same class image twice."""
    usable = class_images[class_images["status"] == STATUS_OK]
    slots: dict[str, list[SegMixSubject]] = {cid: [] for cid in character_nouns}
    for noun in sorted(set(character_nouns.values())):
        sharing = sorted(cid for cid, n in character_nouns.items() if n == noun)
        rows = usable[usable["class_noun"] == noun].to_dict("records")
        for index, row in enumerate(rows):
            cid = sharing[index % len(sharing)]
            slots[cid].append(SegMixSubject(_load_cutout(row["cutout_path"]), f"a {noun}", cid, row["cutout_sha256"]))
    return slots
