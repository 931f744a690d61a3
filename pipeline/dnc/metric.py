"""D&C scoring from similarities (MuDI Algorithm 3, docs/design.md#scoring-and-modes): pure numpy, no models.

``S[b, j]`` is box b's mean cosine similarity to subject j's references and ``G[i, j]`` the mean similarity
between subject i's and subject j's references. A good two-character image has one box per subject, each box
looking like its own subject and as unlike the other as the references are: after aligning boxes to subjects,
``S_aligned ≈ G``, and ``D&C = 1 − ‖S_aligned − G‖``.

Two modes: ``mudi`` reproduces MuDI's code exactly (OWLv2 queried with the bare class nouns, e.g. ``dog``,
greedy alignment, spectral norm, self-pairs in G's diagonal); ``default`` queries ``a photo of a dog``, aligns
optimally (Hungarian, maximising the aligned diagonal) and leaves the self-pairs (always 1.0) out of G's
diagonal, which otherwise inflates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.errors import CastloraError

ASSIGNMENTS = ("greedy", "hungarian")
NORMS = ("spectral", "frobenius")
COUNT_MISMATCH = "count_mismatch"
CLASS_NOUN_FIELD = "{class_noun}"
BARE_QUERY = CLASS_NOUN_FIELD
"""MuDI's OWLv2 query: the class name itself (its 0.4 threshold was tuned on these)."""
PHOTO_QUERY = "a photo of a {class_noun}"
"""The CLIP-style query of castlora's default mode."""


@dataclass(frozen=True)
class DncMode:
    name: str
    assignment: str
    norm: str
    include_self: bool
    """Count each reference's similarity to itself (1.0) in G's diagonal, as MuDI does."""
    nms: bool
    """Class-agnostic NMS on the detector's boxes (MuDI applies none)."""
    query_template: str = PHOTO_QUERY
    """The detector's text query per class noun (``{class_noun}`` is replaced); recorded with every score."""

    def __post_init__(self) -> None:
        if CLASS_NOUN_FIELD not in self.query_template:
            raise CastloraError(
                f"D&C mode {self.name!r}: query_template must contain {CLASS_NOUN_FIELD}; got {self.query_template!r}."
            )

    def query(self, class_noun: str) -> str:
        # str.replace, not str.format: a template may contain other braces.
        return self.query_template.replace(CLASS_NOUN_FIELD, class_noun.strip())


MODES: dict[str, DncMode] = {
    "mudi": DncMode(
        "mudi", assignment="greedy", norm="spectral", include_self=True, nms=False, query_template=BARE_QUERY
    ),
    "default": DncMode(
        "default", assignment="hungarian", norm="spectral", include_self=False, nms=True, query_template=PHOTO_QUERY
    ),
}


def get_mode(name: str) -> DncMode:
    try:
        return MODES[name]
    except KeyError:
        raise CastloraError(f"Unknown D&C mode {name!r}; choose one of {sorted(MODES)}.") from None


@dataclass(frozen=True)
class DncResult:
    score: float
    """1 − ‖S_aligned − G‖ (not clipped: it can be negative); 0.0 when the count gate fails."""
    assignment: tuple[int, ...] | None
    """Box index per subject (subject order); None when the count gate failed."""
    reason: str | None
    """None, or ``"count_mismatch"`` when the number of boxes differs from the number of subjects."""
    S: np.ndarray
    """(boxes, subjects) mean similarities, in detection order."""
    G: np.ndarray
    S_aligned: np.ndarray | None = None
    """(subjects, subjects): row j is the box assigned to subject j."""


def l2_normalize(vectors: np.ndarray, what: str = "embeddings") -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise CastloraError(f"{what} must be a 2-D array (items × dim); got shape {vectors.shape}.")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise CastloraError(f"{what} contain a zero or non-finite vector; cannot L2-normalise it.")
    return vectors / norms


def reference_gram(ref_embeddings: Sequence[np.ndarray], include_self: bool = True) -> np.ndarray:
    """``G[i, j]`` = mean of ``E_i E_jᵀ`` over all reference pairs (each E L2-normalised here).

    With ``include_self=False`` the diagonal blocks leave out each reference paired with itself; that needs at
    least two references per subject.
    """
    if len(ref_embeddings) == 0:
        raise CastloraError("reference_gram needs the references of at least one subject.")
    normalized = [l2_normalize(e, f"references of subject {j}") for j, e in enumerate(ref_embeddings)]
    dims = {e.shape[1] for e in normalized}
    if len(dims) != 1:
        raise CastloraError(f"Reference embeddings of the subjects have different dimensions {sorted(dims)}.")
    n = len(normalized)
    gram = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            block = normalized[i] @ normalized[j].T
            if i == j and not include_self:
                k = block.shape[0]
                if k < 2:
                    raise CastloraError(
                        f"Subject {i} has one reference: G without self-pairs needs at least two; add photos or "
                        "use include_self=True (MuDI mode)."
                    )
                gram[i, j] = (block.sum() - np.trace(block)) / (k * (k - 1))
            else:
                gram[i, j] = block.mean()
    return gram


def mean_similarities(box_ref_sims: Sequence[Sequence[np.ndarray]], n_subjects: int) -> np.ndarray:
    """``S[b, j]`` = mean of box b's similarities to subject j's references."""
    rows = []
    for b, per_subject in enumerate(box_ref_sims):
        if len(per_subject) != n_subjects:
            raise CastloraError(f"Box {b} has similarities for {len(per_subject)} subjects; G has {n_subjects}.")
        row = []
        for j, sims in enumerate(per_subject):
            sims = np.asarray(sims, dtype=np.float64).reshape(-1)
            if sims.size == 0:
                raise CastloraError(f"Box {b} has no similarities to subject {j}'s references.")
            row.append(float(sims.mean()))
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), n_subjects)


def align(S: np.ndarray, method: str) -> tuple[int, ...]:
    """Box index per subject for a square S (boxes == subjects)."""
    n = S.shape[1]
    if method == "greedy":
        # MuDI: subject columns in order, each takes the unused box with the highest similarity to it.
        used: list[int] = []
        for j in range(n):
            order = np.argsort(-S[:, j], kind="stable")
            used.append(int(next(b for b in order if b not in used)))
        return tuple(used)
    if method == "hungarian":
        boxes, subjects = linear_sum_assignment(S, maximize=True)
        by_subject = dict(zip(subjects.tolist(), boxes.tolist(), strict=True))
        return tuple(int(by_subject[j]) for j in range(n))
    raise CastloraError(f"Unknown D&C assignment {method!r}; choose one of {ASSIGNMENTS}.")


def matrix_norm(matrix: np.ndarray, norm: str) -> float:
    if norm == "spectral":
        return float(np.linalg.norm(matrix, ord=2))
    if norm == "frobenius":
        return float(np.linalg.norm(matrix, ord="fro"))
    raise CastloraError(f"Unknown D&C norm {norm!r}; choose one of {NORMS}.")


def dnc_from_similarities(
    box_ref_sims: Sequence[Sequence[np.ndarray]],
    G: np.ndarray,
    assignment: str = "hungarian",
    norm: str = "spectral",
) -> DncResult:
    """D&C of one image from its boxes' similarities to every subject's references and the references' ``G``.

    ``box_ref_sims[b][j]`` is the 1-D array of box b's cosine similarities to subject j's references. A box count
    different from the subject count scores 0 with reason ``"count_mismatch"``.
    """
    if assignment not in ASSIGNMENTS:
        raise CastloraError(f"Unknown D&C assignment {assignment!r}; choose one of {ASSIGNMENTS}.")
    if norm not in NORMS:
        raise CastloraError(f"Unknown D&C norm {norm!r}; choose one of {NORMS}.")
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise CastloraError(f"G must be a square (subjects × subjects) matrix; got shape {G.shape}.")
    n_subjects = G.shape[0]
    S = mean_similarities(box_ref_sims, n_subjects)
    if S.shape[0] != n_subjects:
        return DncResult(0.0, None, COUNT_MISMATCH, S, G)
    chosen = align(S, assignment)
    aligned = S[list(chosen), :]
    score = 1.0 - matrix_norm(aligned - G, norm)
    return DncResult(score, chosen, None, S, G, aligned)
