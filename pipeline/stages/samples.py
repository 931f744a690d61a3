"""Stage: render the characters together with the pair's trained LoRA, optionally from MuDI's mean-shifted init.

Every prompt gets one image per seed (image k uses ``seeds[k]``); how images, layouts, the manifest and lineage
are written is ``pipeline.rendering.render_samples``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.infer import Layout
from pipeline.lora.record import LoraRecord
from pipeline.rendering import RenderSettings, render_samples
from pipeline.storage.lineage import LineageRecorder


def run_samples(
    *,
    pipe: Any,
    lora: LoraRecord,
    prompts: Sequence[str],
    seeds: Sequence[int],
    layout_factory: Callable[[int], Layout] | None,
    gamma: float | None,
    settings: RenderSettings,
    out_dir: Path,
    recorder: LineageRecorder,
    model_ids: Sequence[str] = (),
) -> pd.DataFrame:
    """Load ``lora`` into ``pipe`` and render every prompt once per seed into ``out_dir``; returns the manifest.

    ``gamma=None`` renders from plain noise; otherwise ``layout_factory(seed)`` gives each seed's layout."""
    pipe.load_lora_weights(str(lora.diffusers))
    return render_samples(
        pipe=pipe,
        prompts=prompts,
        seeds=seeds,
        images_per_prompt=len(seeds),
        layout_factory=layout_factory,
        gamma=gamma,
        settings=settings,
        lora_version=lora.version,
        lora_sha256=lora.diffusers_sha256,
        out_dir=out_dir,
        recorder=recorder,
        model_ids=model_ids,
    )
