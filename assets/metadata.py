"""Turning images and tables into Dagster metadata the UI renders."""

from __future__ import annotations

import base64
import errno
import functools
import io
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import dagster as dg
import pandas as pd
from PIL import Image

from pipeline.errors import CastloraError
from pipeline.images import image_grid

P = ParamSpec("P")
R = TypeVar("R")


def image_md(image: Image.Image, title: str = "preview", max_side: int = 768) -> dg.MetadataValue:
    """Inline JPEG as markdown: the UI shows it without needing access to the data home."""
    preview = image.convert("RGB")
    preview.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    preview.save(buffer, format="JPEG", quality=80)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/jpeg;base64,{encoded})")


def grid_md(paths: Sequence[str], columns: int, title: str = "preview") -> dg.MetadataValue:
    """A contact sheet of the image files at ``paths`` (``_none_`` when there are none)."""
    if not paths:
        return dg.MetadataValue.md("_none_")
    images = []
    for path in paths:
        with Image.open(path) as opened:
            images.append(opened.copy())
    return image_md(image_grid(images, columns=columns), title)


def table_md(frame: pd.DataFrame, max_rows: int = 50) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    shown = frame.head(max_rows)
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "|" + "---|" * len(shown.columns)
    body = [
        "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
        for row in shown.itertuples(index=False)
    ]
    more = [f"\n_{len(frame) - max_rows} more rows in the Parquet manifest_"] if len(frame) > max_rows else []
    return dg.MetadataValue.md("\n".join([header, rule, *body, *more]))


# OS errors a person fixes on the machine (not bugs): shown as one clear message naming the path.
_STORAGE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a folder in its path is a file",
    errno.EFBIG: "the file is larger than this file system or process allows",
}


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn castlora's user-facing errors into ``dg.Failure`` so the UI shows the message itself, not a
    wrapped traceback; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CastloraError as exc:
            raise dg.Failure(description=str(exc), metadata={"error_type": type(exc).__name__}) from exc
        except OSError as exc:
            problem = _STORAGE_PROBLEMS.get(exc.errno) if exc.errno is not None else None
            if problem is None:
                raise
            storage = kwargs.get("storage")
            where = exc.filename or f"a file under the data home {storage.home if storage else ''}".strip()
            raise dg.Failure(
                description=(
                    f"Could not use {where}: {problem} ({exc.strerror}). Stages already materialized are kept. "
                    "Free space or fix permissions on that volume (or point CASTLORA_HOME at a writable folder "
                    "with room), then materialize again."
                ),
                metadata={"error_type": type(exc).__name__, "errno": exc.errno},
            ) from exc

    return wrapper


def loss_curve_md(losses: Sequence[tuple[int, float, float]], title: str = "training loss") -> dg.MetadataValue:
    """Loss (and learning rate) per step as an inline PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    steps = [s for s, _, _ in losses]
    axis.plot(steps, [loss for _, loss, _ in losses], linewidth=1, label="loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")
