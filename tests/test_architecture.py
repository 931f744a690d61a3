"""The layering rules of the project, checked on the source: assets → resources → pipeline, never back."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = roots
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("pipeline", {"dagster", "dagster_webserver", "assets", "resources"}), ("resources", {"assets"})],
)
def test_dependencies_point_one_way(package, forbidden):
    offenders = {path: roots & forbidden for path, roots in imported_roots(package).items() if roots & forbidden}
    assert not offenders, f"{package}/ must not import {sorted(forbidden)}: {offenders}"


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: `pip install -e '.[dev]'`")
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"


def _design_anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation removed, spaces to '-', repeats suffixed -1, -2, ..."""
    import re  # local: this block is appended without touching the module's imports

    anchors: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        heading = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_fence or not heading:
            continue
        base = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchor, n = base, 0
        while anchor in anchors:
            n += 1
            anchor = f"{base}-{n}"
        anchors.add(anchor)
    return anchors


def test_code_cites_only_the_design_doc_and_its_anchors_exist():
    """Docstrings cite docs/design.md#<anchor> (an existing heading), never the external spec or ../shared."""
    import re

    outside = re.compile(r"SPEC §|SPEC\.md|\.\./shared|/work/shared|reference/SPEC")
    cited = re.compile(r"docs/design\.md#([\w-]+)")
    anchors = _design_anchors((REPO / "docs" / "design.md").read_text(encoding="utf-8"))
    offenders, dangling = [], []
    for package in ("pipeline", "resources", "assets", "tests"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if package != "tests" and outside.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
                dangling += [f"{name}:{number}: #{a}" for a in cited.findall(line) if a not in anchors]
    assert not offenders, "cite docs/design.md#<anchor>, not the external spec or paths outside the repository:\n" + (
        "\n".join(offenders)
    )
    assert not dangling, f"no such heading in docs/design.md (anchors: {sorted(anchors)}):\n" + "\n".join(dangling)


TRAIN_MODULE_MAX_LINES = 400


def test_no_training_module_is_over_400_lines():
    """``pipeline/train`` stays one concept per file (trainer, loop, losses, runtime, caches, ...)."""
    too_long = {
        path.relative_to(REPO).as_posix(): count
        for path in sorted((REPO / "pipeline" / "train").rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > TRAIN_MODULE_MAX_LINES
    }
    assert not too_long, f"split these modules (over {TRAIN_MODULE_MAX_LINES} lines): {too_long}"


def _code_names(tree: ast.AST) -> set[str]:
    """Identifiers, attribute names and string literals of a module, docstrings excluded."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


def test_only_the_family_modules_name_sdxl_components():
    """Training, generation, stages and assets reach SDXL's parts through ``pipeline.families`` (the model-family
    seam, docs/design.md#model-families); only the family modules, the model loaders and the SDXL LoRA formats
    (``pipeline/lora``) name them in code."""
    sdxl_only = {"StableDiffusionXLPipeline", "UNet2DConditionModel", "time_ids", "text_encoder_2"}
    allowed = ("pipeline/families/", "pipeline/models/", "pipeline/lora/")
    offenders = []
    for package in ("pipeline", "resources", "assets"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if not name.startswith(allowed):
                found = _code_names(ast.parse(path.read_text(encoding="utf-8"))) & sdxl_only
                offenders += [f"{name}: {sorted(found)}"] if found else []
    assert not offenders, "family-specific names outside pipeline/families:\n" + "\n".join(offenders)


# --- Stages as leaves (docs/design.md): a stage imports no other stage, and nothing else in pipeline/ imports one.

STAGES_PACKAGE = "pipeline.stages"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (``from pipeline.stages import lora`` gives ``pipeline.stages.lora``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def stage_modules_imported(path: Path) -> set[str]:
    """The stage modules (``pipeline.stages.<name>``) that ``path`` imports."""
    return {
        name
        for name in imported_modules(path)
        if name.startswith(STAGES_PACKAGE + ".") and name.count(".") >= 2 and name.split(".")[2] != "__init__"
    }


def stage_rule_offenders(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(stages importing another stage, non-stage modules of ``pipeline/`` importing a stage) under ``root``."""
    between_stages, into_stages = {}, {}
    for path in sorted((root / "pipeline").rglob("*.py")):
        relative = path.relative_to(root)
        imported = {".".join(name.split(".")[:3]) for name in stage_modules_imported(path)}
        if relative.parts[:2] == ("pipeline", "stages"):
            own = f"{STAGES_PACKAGE}.{path.stem}"
            if imported - {own}:
                between_stages[relative.as_posix()] = imported - {own}
        elif imported:
            into_stages[relative.as_posix()] = imported
    return between_stages, into_stages


def test_no_stage_imports_another_stage():
    between_stages, _ = stage_rule_offenders(REPO)
    assert not between_stages, (
        "a stage must not import another stage: move the shared piece to a non-stage module "
        f"(pipeline/lora/, pipeline/rendering.py, ...): {between_stages}"
    )


def test_no_module_outside_the_stages_imports_a_stage():
    _, into_stages = stage_rule_offenders(REPO)
    assert not into_stages, f"only assets (and tests) may import pipeline/stages/: {into_stages}"


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        ("pipeline/stages/samples.py", "from pipeline.stages.segments import run_segments\n", 0),
        ("pipeline/stages/samples.py", "from pipeline.stages import lora\n", 0),
        ("pipeline/stages/samples.py", "import pipeline.stages.lora as other\n", 0),
        ("pipeline/train/data.py", "from pipeline.stages.segments import run_segments\n", 1),
        ("pipeline/rendering.py", "def later():\n    from pipeline.stages.lora import run_lora\n", 1),
    ],
)
def test_the_stage_rules_catch_a_violation(tmp_path, path, source, rule):
    """The rules above find a stage import in a stage or outside the stages, at any depth of the module."""
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(source)
    (tmp_path / "pipeline/stages").mkdir(parents=True, exist_ok=True)
    (tmp_path / "pipeline/stages/own.py").write_text("from pipeline.stages.own import helper\n")  # itself: fine
    offenders = stage_rule_offenders(tmp_path)
    assert path in offenders[rule] and not offenders[1 - rule]


def positional_stage_functions(root: Path) -> list[str]:
    """Stage functions (``run_*`` in ``pipeline/stages/``) that accept an argument by position."""
    found = []
    for path in sorted((root / "pipeline" / "stages").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.startswith("run_")
                and (node.args.args or node.args.vararg)
            ):
                found.append(f"{path.relative_to(root).as_posix()}: {node.name}")
    return found


def test_stage_functions_take_keyword_arguments_only(tmp_path):
    assert not positional_stage_functions(REPO), "add `*` first: stage functions take keyword arguments only"
    (tmp_path / "pipeline" / "stages").mkdir(parents=True)
    (tmp_path / "pipeline" / "stages" / "x.py").write_text("def run_x(a, *, b): ...\ndef run_y(*, a): ...\n")
    assert positional_stage_functions(tmp_path) == ["pipeline/stages/x.py: run_x"]
