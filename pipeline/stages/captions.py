"""Stage 3: one caption per reference photo, token phrase in place of the class noun.

A photo with a user caption (the spec's ``captions`` folder, ``<photo stem>.txt``; MuDI's metadata ``text``
after ``castlora import-mudi``) keeps it verbatim; the others are captioned by the backend. Captions are also
written as kohya-style sidecar ``.txt`` files so other trainers can read the set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.captions import CaptionCache, Captioner, caption_image
from pipeline.errors import CastloraError
from pipeline.spec import PairSpec
from pipeline.storage.hashing import sha256_bytes
from pipeline.storage.lineage import LineageRecorder
from pipeline.storage.manifest import prune_unlisted, write_manifest
from pipeline.storage.paths import confined_path

USER_BACKEND = "user"
MAX_CAPTION_BYTES = 64 * 1024


def user_caption_files(spec: PairSpec) -> dict[tuple[str, str], Path]:
    """(character id, photo stem) -> the user caption file ``<captions folder>/<stem>.txt``, for characters
    whose spec names a ``captions`` folder (stems, unlike paths, survive a moved data home). For an inbox spec
    each file is checked against the pair folder here, right before the stage reads it."""
    found: dict[tuple[str, str], Path] = {}
    for character in spec.characters:
        if character.captions_dir:
            for photo in character.photos:
                candidate = Path(character.captions_dir) / f"{Path(photo).stem}.txt"
                if candidate.is_file():
                    if spec.confined_to:
                        confined_path(candidate, Path(spec.confined_to), f"User caption of {character.id!r}")
                    found[(character.id, Path(photo).stem)] = candidate
    return found


def _user_caption(path: Path, token_phrase: str) -> str:
    """The caption in ``path``. Errors name the file and what was expected but never quote its contents: they
    reach logs and the UI, and the file might not hold what its name says."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CAPTION_BYTES + 1)
        text = " ".join(data.decode("utf-8").split())
    except UnicodeDecodeError as exc:
        raise CastloraError(
            f"User caption {path} is not UTF-8 text (invalid byte at position {exc.start}); save it as UTF-8."
        ) from exc
    except OSError as exc:
        raise CastloraError(f"User caption {path} cannot be read ({type(exc).__name__}: {exc.strerror}).") from exc
    if len(data) > MAX_CAPTION_BYTES:
        raise CastloraError(f"User caption {path} is over {MAX_CAPTION_BYTES} bytes; a caption is one sentence.")
    if token_phrase.lower() not in text.lower():
        raise CastloraError(
            f"User caption {path} does not contain the token phrase {token_phrase!r} (it has {len(text.split())} "
            "words; its text is not shown): the phrase is what ties the caption to the character. Add it, or delete "
            "the file to caption the photo with the backend."
        )
    return text


def run_captions(
    *,
    references: pd.DataFrame,
    out_dir: Path,
    captioner: Captioner,
    cache: CaptionCache,
    recorder: LineageRecorder,
    user_captions: Mapping[tuple[str, str], Path] | None = None,
) -> pd.DataFrame:
    """Caption every reference; ``user_captions`` ((character id, source photo stem) -> caption file) win."""
    rows: list[dict] = []
    written: set[Path] = set()
    user_captions = user_captions or {}
    for record in references.to_dict("records"):
        user_file = user_captions.get((record["character_id"], Path(record["source"]).stem))
        if user_file is not None:
            text = _user_caption(Path(user_file), record["token_phrase"])
            raw, cached, backend, model, prompt_version = text, False, USER_BACKEND, None, None
        else:
            with Image.open(record["path"]) as opened:
                image = opened.convert("RGB")
            result = caption_image(
                captioner, cache, image, record["sha256"], record["class_noun"], record["token_phrase"]
            )
            text, raw, cached = result.text, result.raw, result.cached
            backend, model, prompt_version = captioner.backend, captioner.model, captioner.prompt_version
        path = out_dir / record["character_id"] / f"{record['sha256'][:16]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        path.write_bytes(data)
        written.add(path)
        sha = sha256_bytes(data)
        params = {"backend": backend, "prompt_version": prompt_version, "cached": cached}
        if user_file is not None:
            params["user_caption"] = str(user_file)
        recorder.record(path, sha, [record["sha256"]], params, [model] if model else [])
        rows.append(
            {
                "character_id": record["character_id"],
                "reference_sha256": record["sha256"],
                "reference_path": record["path"],
                "caption": text,
                "raw_caption": raw,
                "backend": backend,
                "model": model,
                "prompt_version": prompt_version,
                "cached": cached,
                "caption_path": str(path),
                "caption_sha256": sha,
            }
        )
    manifest = pd.DataFrame(rows)
    write_manifest(manifest, out_dir)
    prune_unlisted(out_dir, written)
    return manifest
