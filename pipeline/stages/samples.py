"""Stage: render the characters together with the pair's trained LoRA, optionally from MuDI's mean-shifted init.

Every prompt gets one image per seed (image k uses ``seeds[k]``); how images, layouts, the manifest and lineage
are written is ``pipeline.rendering.render_samples``'s. Each prompt may choose its layout (user boxes, relative
sizes, an LLM's boxes or the random Seg-Mix default: docs/design.md#layout-control); LLM layouts are asked for
before the LoRA is loaded or anything is rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import CastloraError, LayoutError
from pipeline.infer import Layout
from pipeline.layout_control import (
    DEFAULT_LLM_RETRIES,
    LlmLayout,
    PairLayouts,
    PromptEntry,
    TextCompleter,
    ask_llm_layout,
)
from pipeline.lora.record import LoraRecord
from pipeline.rendering import RenderSettings, render_samples
from pipeline.storage.lineage import LineageRecorder


def run_samples(
    *,
    pipe: Any,
    lora: LoraRecord,
    prompts: Sequence[str | PromptEntry],
    seeds: Sequence[int],
    layouts: PairLayouts | None,
    gamma: float | None,
    settings: RenderSettings,
    out_dir: Path,
    recorder: LineageRecorder,
    model_ids: Sequence[str] = (),
    layout_client: TextCompleter | None = None,
    llm_retries: int = DEFAULT_LLM_RETRIES,
) -> pd.DataFrame:
    """Load ``lora`` into ``pipe`` and render every prompt once per seed into ``out_dir``; returns the manifest.

    ``gamma=None`` renders from plain noise (every prompt's layout must then be ``auto``); otherwise each image
    starts from its prompt's layout of ``layouts`` for its seed. ``layout_client`` answers the ``llm`` prompts."""
    entries = [p if isinstance(p, PromptEntry) else PromptEntry(p) for p in prompts]
    chosen = [(i, e) for i, e in enumerate(entries) if e.layout.mode != "auto"]
    if chosen and gamma is None:
        i, entry = chosen[0]
        raise LayoutError(
            f"samples prompt {i + 1} ({entry.prompt[:80]!r}) asks for a {entry.layout.mode} layout but gamma is "
            "null (plain noise, no layout): set gamma (MuDI init, e.g. 1.0) or use layout auto."
        )
    if gamma is not None and layouts is None:
        raise LayoutError("gamma is set (MuDI init) but no layouts were given: pass the pair's cut-outs.")
    answers: dict[int, LlmLayout] = {}
    for i, entry in chosen:
        if entry.layout.mode != "llm":
            continue
        if layout_client is None:
            raise LayoutError(
                f"samples prompt {i + 1} ({entry.prompt[:80]!r}) asks for an llm layout but no chat client is set."
            )
        phrases = {cid: group[0].phrase for cid, group in layouts.subjects.items()}
        answers[i] = ask_llm_layout(
            layout_client,
            entry.prompt,
            phrases,
            (settings.width, settings.height),
            llm_retries,
            what=f"samples prompt {i + 1} ({entry.prompt[:80]!r}) llm layout",
        )
    factories = [layouts.factory(e.layout, answers.get(i)) if layouts else None for i, e in enumerate(entries)]
    # Every prompt's own layouts are made now, before the LoRA loads, so one that cannot be made (sizes no
    # Seg-Mix layout can satisfy) fails naming its prompt before anything renders; rendering reuses them.
    factories = [
        _prebuilt(factory, seeds, i, entries[i]) if factory is not None else None for i, factory in enumerate(factories)
    ]
    pipe.load_lora_weights(str(lora.diffusers))
    return render_samples(
        pipe=pipe,
        prompts=[e.prompt for e in entries],
        seeds=seeds,
        images_per_prompt=len(seeds),
        layout_factory=layouts.segmix if layouts is not None and gamma is not None else None,
        gamma=gamma,
        settings=settings,
        lora_version=lora.version,
        lora_sha256=lora.diffusers_sha256,
        out_dir=out_dir,
        recorder=recorder,
        model_ids=model_ids,
        prompt_layouts=factories,
    )


def _prebuilt(
    factory: Callable[[int], Layout], seeds: Sequence[int], index: int, entry: PromptEntry
) -> Callable[[int], Layout]:
    built: dict[int, Layout] = {}
    for seed in seeds:
        try:
            built[int(seed)] = factory(int(seed))
        except CastloraError as exc:
            raise LayoutError(
                f"samples prompt {index + 1} ({entry.prompt[:80]!r}): its {entry.layout.mode} layout for seed {seed} "
                f"cannot be made: {exc}"
            ) from exc
    return lambda seed: built[seed] if seed in built else factory(seed)
