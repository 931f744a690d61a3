"""Shared test set-up: offline model hub, and small image factories."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PAIR = REPO / "samples" / "dog6__dog2"

# Fixtures that start real servers on 127.0.0.1.
pytest_plugins = ["tests.servers.postgres", "tests.servers.s3"]


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test starts from the same environment: code under test (the CLI sets DAGSTER_HOME and CASTLORA_HOME
    for its process) must not leak a deleted temporary home into the next test's Dagster instance."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def subject_photo(size: tuple[int, int] = (320, 256), seed: int = 0, colour=(200, 60, 40)) -> Image.Image:
    """A light, slightly noisy background with one dark-ish ellipse 'subject' near the centre."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.full((height, width, 3), 235, dtype=np.int16) + rng.integers(-8, 8, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    cx, cy = width / 2 + rng.integers(-10, 10), height / 2 + rng.integers(-10, 10)
    inside = ((xx - cx) / (width * 0.25)) ** 2 + ((yy - cy) / (height * 0.3)) ** 2 <= 1
    pixels[inside] = np.array(colour) + rng.integers(-10, 10, (int(inside.sum()), 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def ball_pair(root: Path, key: str = "red__blue") -> Path:
    """``root/src``: a two-ball pair (3 photos each, 'zorp ball' and 'quix ball') for module-scoped end-to-end runs."""
    folder = root / "src"
    first, second = key.split("__")
    for index, cid in enumerate((first, second)):
        (folder / cid).mkdir(parents=True)
        colour = (200, 40, 40) if index == 0 else (40, 40, 200)
        for n in range(3):
            subject_photo((320, 256), seed=10 * index + n, colour=colour).save(folder / cid / f"{n}.jpg", quality=95)
    (folder / "pair.yaml").write_text(
        f"pair: {key}\ncharacters:\n"
        f"  - {{id: {first}, class_noun: ball, token_phrase: zorp ball, photos: {first}}}\n"
        f"  - {{id: {second}, class_noun: ball, token_phrase: quix ball, photos: {second}}}\n"
    )
    return folder


@pytest.fixture
def make_pair(tmp_path: Path):
    """Write a pair folder (spec + photos) and return its path; photos differ so none are duplicates."""

    def build(key: str = "alpha__beta", photos_per_character: int = 3, size=(320, 256)) -> Path:
        folder = tmp_path / key
        characters = []
        for index, cid in enumerate(key.split("__")):
            photo_dir = folder / cid
            photo_dir.mkdir(parents=True)
            for n in range(photos_per_character):
                colour = (40 + 80 * index, 60 + 20 * n, 150 - 40 * index)
                subject_photo(size, seed=10 * index + n, colour=colour).save(photo_dir / f"{n:02d}.jpg", quality=92)
            characters.append(
                f"  - id: {cid}\n    class_noun: dog\n    token_phrase: tok{index} dog\n    photos: {cid}\n"
            )
        (folder / "pair.yaml").write_text(f"pair: {key}\ncharacters:\n" + "".join(characters))
        return folder

    return build


@dataclass(frozen=True)
class DemoHome:
    """Where `castlora demo` left its outputs: the data home, its Dagster instance, and what it printed."""

    data_home: Path
    dagster_home: Path
    stdout: str


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> DemoHome:
    """`castlora demo` (about 3 minutes on 2 cores), run once per session for the CLI test and the UI tests."""
    data_home = tmp_path_factory.mktemp("demo") / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "CASTLORA_HOME")}
    env["CASTLORA_HOME"] = str(data_home)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "assets.cli", "demo"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"castlora demo did not finish in {exc.timeout:.0f} s; last output:\n{str(exc.stderr)[-2000:]}")
    if result.returncode != 0:
        pytest.fail(f"castlora demo exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return DemoHome(data_home=data_home, dagster_home=data_home / "dagster_home", stdout=result.stdout)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models are faster on one, and the test machine is shared."""
    import torch  # not at import time: most test modules never load torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
