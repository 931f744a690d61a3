"""Evaluation metric tables → summary table, markdown report and PNG plots a person reads at a glance.

Input is the long metrics table (one row per variant, image, metric, subject; see ``METRIC_COLUMNS``) and,
optionally, the iterative-training rounds table (``ROUND_COLUMNS``). Nothing here loads a model.

A metric that could not be computed is never shown as a number: in the summary its cell is the string
``"unavailable"`` (its model/weights are missing) or ``"undefined"`` (the model ran, but no image gave a value,
e.g. every image failed the count gate so no box was assigned to the subject). Summary columns therefore hold
floats or one of those two strings; write the long table, not the summary, to Parquet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

METRIC_COLUMNS = (
    "variant",
    "image_path",
    "prompt_index",
    "prompt",
    "seed",
    "metric",
    "subject",
    "value",
    "status",
    "note",
)
ROUND_COLUMNS = (
    "round",
    "n_generated",
    "n_kept",
    "dnc_median",
    "dnc_median_kept",
    "kept_distance",
    "distance_ratio",
    "prompt_distance",
    "converged",
    "stop_reason",
)

UNAVAILABLE = "unavailable"
"""Summary cell: the metric's model or weights are missing (see ``availability`` for why)."""
UNDEFINED = "undefined"
"""Summary cell: the metric ran but had no value on any image of the variant."""

BASELINE_VARIANT = "dreambooth"
COUNT_FAIL_METRIC = "count_fail"
COUNT_FAIL_COLUMN = "count_fail_rate"
HEADLINE_MODE = "dnc_default"
EMBEDDER_PREFERENCE = ("dinov2", "clip", "dreamsim_style")
"""Which embedder's default-mode D&C picks the headline winner, first available wins."""

# Summary columns are grouped by family so the table reads top-down: D&C, gate, per-subject, text, aesthetics.
_FAMILY_ORDER = ("dnc_default", "dnc_mudi", COUNT_FAIL_METRIC, "subject_sim", "clip_t", "image_reward")
_LOWER_IS_BETTER = frozenset({COUNT_FAIL_COLUMN})
_NOT_A_SCORE = frozenset({"n_images"})

TRAINING_COLUMNS = ("variant", "family", "base_model", "lora", "steps", "segmix_p", "differs_from_segmix")
"""The training-settings table: per variant its model family (``sdxl``, ``flux``) and base model (so LoRAs of
different families can stand side by side), its LoRA version, steps trained, Seg-Mix probability and every
training setting that differs from the Seg-Mix LoRA's (``field: segmix value → variant value``)."""

STOP_REASONS = {
    "distance": "the kept set's mean pairwise distance fell below the threshold fraction of round 0",
    "prompt_distance": "for every prompt, the mean pairwise distance of all its images fell below d_conv",
    "no_improvement": "the median D&C stopped improving",
    "max_rounds": "the maximum number of rounds was reached",
}

PLOT_SIZE = (6.0, 3.5)
PLOT_DPI = 100


def metric_key(metric: str, subject: str | None) -> str:
    """Summary column name: ``metric`` for whole-image metrics, ``metric[subject]`` for per-subject ones."""
    return f"{metric}[{subject}]" if subject else metric


def _require_columns(frame: pd.DataFrame, required: Sequence[str], what: str) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; expected at least {list(required)}")


def _with_keys(metrics: pd.DataFrame) -> pd.DataFrame:
    _require_columns(metrics, ("variant", "image_path", "metric", "subject", "value", "status"), "metrics table")
    frame = metrics.copy()
    subjects = frame["subject"].fillna("").astype(str)
    frame["key"] = [metric_key(m, s) for m, s in zip(frame["metric"].astype(str), subjects, strict=True)]
    values = pd.to_numeric(frame["value"], errors="coerce")
    frame["is_ok"] = (frame["status"] == "ok") & np.isfinite(values.to_numpy(dtype=float))
    frame["value"] = values
    return frame


def _ordered_unique(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values.astype(str)))


def _family(key: str) -> str:
    return key.split(":", 1)[0].split("[", 1)[0]


def _column_order(keys: Sequence[str]) -> list[str]:
    """Group by metric family (known families first), keeping first-appearance order inside a family."""
    rank = {family: index for index, family in enumerate(_FAMILY_ORDER)}
    positions = {key: index for index, key in enumerate(keys)}
    return sorted(keys, key=lambda key: (rank.get(_family(key), len(rank)), positions[key]))


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (first-appearance order), one column per metric (per subject for subject metrics).

    A cell is the mean over images of the ok values, or ``UNAVAILABLE`` / ``UNDEFINED`` when there is none.
    ``count_fail`` becomes ``count_fail_rate`` (its mean is the share of images that failed the count gate).
    """
    frame = _with_keys(metrics)
    variants = _ordered_unique(frame["variant"])
    keys = _column_order(_ordered_unique(frame["key"]))
    rows = []
    for variant in variants:
        of_variant = frame[frame["variant"].astype(str) == variant]
        row: dict[str, object] = {"variant": variant, "n_images": int(of_variant["image_path"].nunique())}
        for key in keys:
            cells = of_variant[of_variant["key"] == key]
            ok_values = cells.loc[cells["is_ok"], "value"]
            if len(ok_values):
                cell: object = float(ok_values.mean())
            elif cells.empty or (cells["status"] == UNAVAILABLE).any():
                cell = UNAVAILABLE
            else:
                cell = UNDEFINED
            row[COUNT_FAIL_COLUMN if key == COUNT_FAIL_METRIC else key] = cell
        rows.append(row)
    columns = ["variant", "n_images", *(COUNT_FAIL_COLUMN if key == COUNT_FAIL_METRIC else key for key in keys)]
    summary = pd.DataFrame(rows, columns=columns)
    # Columns with a string cell must stay object: a float dtype would turn "unavailable" back into a number.
    for column in columns[2:]:
        if all(isinstance(value, float) for value in summary[column]):
            summary[column] = summary[column].astype(float)
        else:
            summary[column] = summary[column].astype(object)
    return summary


def availability(metrics: pd.DataFrame) -> dict[str, str]:
    """Metric name → why it is unavailable, for every metric with an ``unavailable`` row or a variant lacking it.

    When only some variants lack the metric, the note names them.
    """
    frame = _with_keys(metrics)
    variants = _ordered_unique(frame["variant"])
    result: dict[str, str] = {}
    for metric in _ordered_unique(frame["metric"]):
        rows = frame[frame["metric"].astype(str) == metric]
        unavailable = rows[rows["status"] == UNAVAILABLE]
        present = set(rows["variant"].astype(str))
        lacking = [v for v in variants if v in set(unavailable["variant"].astype(str)) or v not in present]
        if not lacking:
            continue
        notes = []
        if "note" in unavailable.columns:
            notes = [n for n in _ordered_unique(unavailable["note"].fillna("")) if n]
        missing_rows = [v for v in variants if v not in present]
        if missing_rows:
            notes.append(f"not computed for {', '.join(missing_rows)}")
        note = "; ".join(notes) or "no reason recorded"
        if len(lacking) < len(variants):
            note += f" (only for: {', '.join(lacking)})"
        result[metric] = note
    return result


@dataclass(frozen=True)
class Headline:
    metric: str
    best_variant: str
    best_value: float
    baseline_value: float | None
    """The ``dreambooth`` variant's value, None when there is no baseline (or it has no value)."""

    @property
    def gain(self) -> float | None:
        return None if self.baseline_value is None else self.best_value - self.baseline_value

    @property
    def relative_gain(self) -> float | None:
        if self.baseline_value is None or self.baseline_value <= 0:
            return None
        return self.best_value / self.baseline_value - 1.0

    def sentence(self) -> str:
        text = f"**Best variant: `{self.best_variant}`** with `{self.metric}` = {self.best_value:.3f}"
        if self.baseline_value is None:
            return text + " (no `dreambooth` baseline to compare with)."
        if self.best_variant == BASELINE_VARIANT:
            return text + " — the `dreambooth` baseline itself is best; no variant improved on it."
        relative = f", {self.relative_gain:+.0%}" if self.relative_gain is not None else ""
        return text + f", {self.gain:+.3f}{relative} over the `dreambooth` baseline ({self.baseline_value:.3f})."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(float(value))


def _headline_metric(summary: pd.DataFrame) -> str | None:
    candidates = [c for c in summary.columns if str(c).startswith(f"{HEADLINE_MODE}:")]
    preference = {f"{HEADLINE_MODE}:{name}": index for index, name in enumerate(EMBEDDER_PREFERENCE)}
    # sorted() is stable: embedders outside the preference keep their column order.
    for column in sorted(candidates, key=lambda c: preference.get(c, len(preference))):
        if any(_is_number(v) for v in summary[column]):
            return column
    return None


def headline_values(summary: pd.DataFrame) -> tuple[str, dict[str, float]] | None:
    """The headline D&C metric's name and its value per variant (variants without a value left out)."""
    metric = _headline_metric(summary)
    if metric is None:
        return None
    values = {str(v): float(x) for v, x in zip(summary["variant"], summary[metric], strict=True) if _is_number(x)}
    return metric, values


def headline(summary: pd.DataFrame) -> Headline | None:
    """Best variant by default-mode D&C of the first available embedder (None when no D&C value exists)."""
    found = headline_values(summary)
    if found is None:
        return None
    metric, values = found
    best_variant, best_value = max(values.items(), key=lambda item: item[1])  # ties: first variant in table order
    return Headline(metric, best_variant, best_value, values.get(BASELINE_VARIANT))


def _cell(value: object, bold: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "—"
    elif isinstance(value, bool | np.bool_):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif _is_number(value):
        text = f"{float(value):.3f}"
    elif value in (UNAVAILABLE, UNDEFINED):
        text = f"_{value}_"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold else text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _best_indices(values: Sequence[object], lower_is_better: bool) -> set[int]:
    """Positions holding the best number (all of them on a tie); none when every number is the same."""
    numbers = [(i, float(v)) for i, v in enumerate(values) if _is_number(v)]
    if len({x for _, x in numbers}) < 2:
        return set()  # nothing to single out
    best = (min if lower_is_better else max)(x for _, x in numbers)
    return {i for i, x in numbers if x == best}


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary transposed (metrics as rows, variants as columns — narrow even with many metrics), the best
    variant per metric in bold."""
    variants = [str(v) for v in summary["variant"]]
    rows = []
    for column in summary.columns:
        if column == "variant":
            continue
        values = list(summary[column])
        best = set() if column in _NOT_A_SCORE else _best_indices(values, column in _LOWER_IS_BETTER)
        label = f"{column} (lower is better)" if column in _LOWER_IS_BETTER else str(column)
        rows.append([_cell(label), *(_cell(v, bold=i in best) for i, v in enumerate(values))])
    return _table(["metric", *(_cell(v) for v in variants)], rows)


def rounds_markdown(rounds: pd.DataFrame) -> str:
    """The rounds table plus one line saying whether and why the loop stopped."""
    if rounds.empty:
        return "_no rounds yet_"
    columns = [c for c in ROUND_COLUMNS if c in rounds.columns]
    columns += [c for c in rounds.columns if c not in columns]
    rows = [[_cell(rounds[c].iloc[i]) for c in columns] for i in range(len(rounds))]
    table = _table(columns, rows)
    stopped = rounds[rounds["stop_reason"].notna() & (rounds["stop_reason"] != "")] if "stop_reason" in rounds else None
    if stopped is None or stopped.empty:
        return table + "\n\nNot stopped yet: no stopping criterion has been met."
    last = stopped.iloc[-1]
    reason = str(last["stop_reason"])
    explained = STOP_REASONS.get(reason, "")
    round_label = _cell(last["round"]) if "round" in stopped.columns else "?"
    return table + f"\n\n**Stopped after round {round_label}: `{reason}`**" + (f" — {explained}." if explained else ".")


def training_markdown(training: pd.DataFrame) -> str:
    """The training-settings table (``TRAINING_COLUMNS``): what each variant's LoRA was trained with."""
    _require_columns(training, TRAINING_COLUMNS, "training settings table")
    rows = [[_cell(row[c]) for c in TRAINING_COLUMNS] for row in training.to_dict("records")]
    return _table(list(TRAINING_COLUMNS), rows)


def render_markdown(
    summary: pd.DataFrame,
    availability: dict[str, str],
    rounds: pd.DataFrame | None,
    title: str,
    notes: Sequence[str] = (),
    training: pd.DataFrame | None = None,
) -> str:
    """The evaluation report: headline, summary table, training settings, rounds, unavailable metrics with
    reasons, notes."""
    parts = [f"# {title}"]
    top = headline(summary)
    parts.append(top.sentence() if top else "_No D&C score available for any variant: no headline._")
    parts += ["## Summary", "Mean over images of each variant (3 decimals); best per metric in bold."]
    parts.append(summary_markdown(summary) if not summary.empty else "_no evaluated images_")
    cells = set(summary.drop(columns=["variant"]).to_numpy().ravel().tolist()) if not summary.empty else set()
    legend = []
    if UNAVAILABLE in cells:
        legend.append("_unavailable_: the metric's model or weights are missing (see below); not a zero")
    if UNDEFINED in cells:
        legend.append("_undefined_: no image of the variant gave a value (e.g. every image failed the count gate)")
    if legend:
        parts.append("\n".join(f"- {line}" for line in legend))
    if training is not None and not training.empty:
        parts += [
            "## Training settings",
            "Steps trained, Seg-Mix probability and every setting that differs from the Seg-Mix LoRA's "
            "(`segmix value → variant value`).",
            training_markdown(training),
        ]
    if rounds is not None:
        parts += ["## Iterative training rounds", rounds_markdown(rounds)]
    parts.append("## Unavailable metrics")
    if availability:
        parts.append("\n".join(f"- `{metric}`: {note}" for metric, note in availability.items()))
    else:
        parts.append("_none: every metric was computed_")
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    return "\n\n".join(parts) + "\n"


# --- plots ----------------------------------------------------------------------------------------------------


def _new_figure() -> Figure:
    # A bare Figure (no pyplot): nothing registers in pyplot's global figure list or touches its backend.
    return Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _message_plot(title: str, message: str, path: str | Path) -> Path:
    figure = _new_figure()
    axis = figure.add_subplot()
    axis.set_axis_off()
    axis.set_title(title)
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=axis.transAxes)
    return _save(figure, path)


def _select_metric(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` is a bare metric name (all subjects pooled) or a summary key ``metric[subject]``."""
    exact = frame[frame["key"] == metric]
    return exact if not exact.empty else frame[frame["metric"].astype(str) == metric]


def plot_score_distributions(metrics: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Per-variant box plot with every image's value as a jittered point; says so when nothing is available."""
    frame = _with_keys(metrics)
    rows = _select_metric(frame, metric)
    variants = _ordered_unique(frame["variant"])
    ok = rows[rows["is_ok"]]
    if ok.empty:
        notes = [] if "note" not in rows.columns else [n for n in _ordered_unique(rows["note"].fillna("")) if n]
        why = UNAVAILABLE if rows.empty or (rows["status"] == UNAVAILABLE).any() else UNDEFINED
        message = f"{metric}: {why}" + (f"\n{'; '.join(notes)}" if notes else "")
        return _message_plot(metric, message, path)
    figure = _new_figure()
    axis = figure.add_subplot()
    jitter = np.random.default_rng(0)
    for position, variant in enumerate(variants, start=1):
        values = ok.loc[ok["variant"].astype(str) == variant, "value"].to_numpy(dtype=float)
        if values.size == 0:
            axis.text(
                position,
                0.5,
                "unavailable",
                ha="center",
                va="center",
                rotation=90,
                fontsize=8,
                color="grey",
                transform=axis.get_xaxis_transform(),
            )
            continue
        axis.boxplot(values, positions=[position], widths=0.5, showfliers=False)
        axis.scatter(position + jitter.uniform(-0.15, 0.15, values.size), values, s=10, alpha=0.6, zorder=3)
        axis.scatter([position], [values.mean()], marker="D", s=25, color="black", zorder=4)
    axis.set_xticks(range(1, len(variants) + 1), variants, fontsize=8)
    axis.set_xlim(0.4, len(variants) + 0.6)
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per image (◆ mean)")
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_rounds(rounds: pd.DataFrame | None, path: str | Path, distance_threshold: float | None = None) -> Path:
    """D&C median (all generated and kept) per round; distance ratio to round 0 on a twin axis, with the
    convergence threshold as a dashed line when given."""
    if rounds is None or rounds.empty:
        return _message_plot("iterative training", "no rounds yet", path)
    _require_columns(rounds, ("round", "dnc_median", "dnc_median_kept", "distance_ratio"), "rounds table")
    ordered = rounds.sort_values("round")
    x = ordered["round"].to_numpy(dtype=int)
    figure = _new_figure()
    axis = figure.add_subplot()
    axis.plot(x, ordered["dnc_median"].to_numpy(dtype=float), "o-", label="D&C median (all)")
    axis.plot(x, ordered["dnc_median_kept"].to_numpy(dtype=float), "s-", label="D&C median (kept)")
    axis.set_xlabel("round")
    axis.set_ylabel("D&C")
    axis.set_xticks(x)
    axis.grid(alpha=0.3)
    ratio_axis = axis.twinx()
    ratio_axis.plot(
        x, ordered["distance_ratio"].to_numpy(dtype=float), "^--", color="tab:green", label="distance ratio"
    )
    if distance_threshold is not None:
        ratio_axis.axhline(
            distance_threshold, color="tab:red", linestyle=":", label=f"threshold {distance_threshold:g}"
        )
    ratio_axis.set_ylabel("kept distance / round 0")
    title = "iterative training"
    if "stop_reason" in ordered.columns:
        stopped = ordered[ordered["stop_reason"].notna() & (ordered["stop_reason"] != "")]
        if not stopped.empty:
            title += f" — stopped at round {int(stopped['round'].iloc[-1])}: {stopped['stop_reason'].iloc[-1]}"
    axis.set_title(title, fontsize=10)
    handles, labels = axis.get_legend_handles_labels()
    more_handles, more_labels = ratio_axis.get_legend_handles_labels()
    # Below the axes: inside, it would hide the points of a short run.
    axis.legend(
        handles + more_handles,
        labels + more_labels,
        fontsize=7,
        ncol=4,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        frameon=False,
    )
    return _save(figure, path)
