"""Static checks of the docker deployment (no Docker engine here): Dockerfiles, compose files, instance config."""

import ast
import fnmatch
import importlib.util
import json
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster._check import CheckError
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config, dagster_instance_config_schema
from dagster._serdes import class_from_code_pointer

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
GRPC_PORT = 4000
S3_VARS = {"CASTLORA_S3_BUCKET", "CASTLORA_S3_PREFIX", "CASTLORA_S3_ENDPOINT_URL"}
AWS_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
POSTGRES_VARS = {"DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD", "DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_DB"}


# --- a small Dockerfile parser -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def words(self) -> list[str]:
        """Exec (JSON array) form as its list, shell form split on whitespace."""
        if self.args.startswith("["):
            return json.loads(self.args)
        return self.args.split()


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction are dropped by Docker too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def key_values(instructions: list[Instruction], keyword: str) -> dict[str, str]:
    """ENV/ARG as a dict; handles `K=V K2=V2` and `ARG NAME` without a default."""
    found: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == keyword:
            for token in re.findall(r'(\w+)(?:=("[^"]*"|\S*))?', ins.args):
                found[token[0]] = token[1].strip('"')
    return found


def dockerfile(name: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / name).read_text(encoding="utf-8"))


def flag_value(words: list[str], flag: str) -> str:
    assert flag in words, f"{flag} missing from {words}"
    return words[words.index(flag) + 1]


def test_parser_reads_continuations_comments_and_both_forms():
    parsed = parse_dockerfile(
        "# comment\nFROM base:1 AS build\nENV A=1 \\\n    B=two\nRUN echo a \\\n  # inner\n  && echo b\n"
        'CMD ["x", "-p", "4000"]\nARG NAME\n'
    )
    assert [i.keyword for i in parsed] == ["FROM", "ENV", "RUN", "CMD", "ARG"]
    assert key_values(parsed, "ENV") == {"A": "1", "B": "two"}
    assert parsed[2].args == "echo a && echo b"
    assert parsed[3].words() == ["x", "-p", "4000"]
    assert key_values(parsed, "ARG") == {"NAME": ""}
    with pytest.raises(AssertionError, match="continued line"):
        parse_dockerfile("RUN echo \\\n")


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = dockerignore_patterns()
    for needed in (".git", ".venv", "castlora_data", "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert needed in patterns, f".dockerignore must exclude {needed}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_is_in_the_build_context(name):
    copies = [i for i in dockerfile(name) if i.keyword == "COPY" and "--from" not in i.args]
    assert copies, f"{name} copies nothing"
    ignored = dockerignore_patterns()
    for ins in copies:
        *sources, _dest = ins.words()
        for source in sources:
            assert (REPO / source).exists(), f"docker/{name}: COPY source {source} does not exist"
            top = Path(source).parts[0]
            hits = [p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(top, p)]
            assert not hits, f"docker/{name}: COPY {source} is excluded by .dockerignore ({hits})"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_serves_the_code_location_over_grpc_as_a_non_root_user(name):
    parsed = dockerfile(name)
    cmd = [i for i in parsed if i.keyword == "CMD"][-1].words()
    assert cmd[:3] == ["dagster", "api", "grpc"], cmd
    module = flag_value(cmd, "-m")
    assert module == "assets.definitions"
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not importable"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert "defs" in assigned, f"{module} defines no top-level `defs`"
    assert flag_value(cmd, "-h") == "0.0.0.0", "the server must listen beyond localhost inside the container"
    assert int(flag_value(cmd, "-p")) == GRPC_PORT
    exposed = {int(p) for i in parsed if i.keyword == "EXPOSE" for p in i.words()}
    assert exposed == {GRPC_PORT}
    users = [i.args for i in parsed if i.keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"{name} must drop root"
    last_user = max(n for n, i in enumerate(parsed) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in parsed[last_user:]), "nothing runs as root after USER"
    env = key_values(parsed, "ENV")
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    assert env["DAGSTER_DISABLE_TELEMETRY"] == "1"


IMAGE_LOCKS = {"Dockerfile": "cpu-image.lock", "Dockerfile.cuda": "cuda-image.lock"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_installs_its_lock_then_the_project_without_unlocked_packages(name):
    parsed = dockerfile(name)
    runs = [i.args for i in parsed if i.keyword == "RUN"]
    joined = " ; ".join(runs)
    lock = IMAGE_LOCKS[name]
    order = [
        joined.find("pip install --require-hashes -r requirements/pip.lock"),
        joined.find(f"pip install --require-hashes -r requirements/{lock}"),
        joined.find('pip install --no-deps --no-build-isolation ".[k8s]"'),
    ]
    assert -1 not in order and order == sorted(order), f"{name}: pip.lock, then {lock}, then the project: {order}"
    assert "pip install -e" not in joined
    copied = " ".join(i.args for i in parsed if i.keyword == "COPY")
    assert f"requirements/{lock}" in copied and "requirements/pip.lock" in copied
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "k8s" in pyproject["project"]["optional-dependencies"]
    # Every unhashed install is torch's CPU wheels only, pinned to the dev lock's versions.
    loose = [r for r in runs if "pip install" in r and "--require-hashes" not in r and "--no-deps" not in r]
    assert not loose, f"{name}: installs that could resolve unlocked releases: {loose}"


def test_cpu_image_pins_torch_to_the_locked_versions():
    locked = dict(re.findall(r"^(torch|torchvision)==(\S+)", (REPO / "requirements" / "dev.lock").read_text(), re.M))
    args = key_values(dockerfile("Dockerfile"), "ARG")
    assert args["TORCH_VERSION"] == locked["torch"], "torch in the CPU image must match requirements/dev.lock"
    assert args["TORCHVISION_VERSION"] == locked["torchvision"]
    runs = " ; ".join(i.args for i in dockerfile("Dockerfile") if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '"torchvision==${TORCHVISION_VERSION}"' in runs


def test_cpu_image_is_python_3_11_with_cpu_torch():
    parsed = dockerfile("Dockerfile")
    assert parsed[0].keyword == "FROM" and re.fullmatch(r"python:3\.11(-[\w.]+)?", parsed[0].args)
    assert "download.pytorch.org/whl/cpu" in " ".join(i.args for i in parsed if i.keyword == "RUN")


def test_cuda_image_is_a_cuda_runtime_with_python_3_11():
    parsed = dockerfile("Dockerfile.cuda")
    base = parsed[0].args
    assert parsed[0].keyword == "FROM" and base.startswith("nvidia/cuda:"), base
    assert "runtime" in base, "the runtime flavour, not devel: nothing is compiled"
    assert key_values(parsed, "ARG")["PYTHON_VERSION"] == "3.11"
    runs = " ; ".join(i.args for i in parsed if i.keyword == "RUN")
    assert '"python${PYTHON_VERSION}"' in runs and '"python${PYTHON_VERSION}" -m venv "$VIRTUAL_ENV"' in runs
    env = key_values(parsed, "ENV")
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin"), "pip and dagster must come from the 3.11 venv"
    assert env["CASTLORA_DEVICE"] == "cuda"


# --- compose ---------------------------------------------------------------------------------------------------

REQUIRED_SERVICES = {"postgres", "s3", "s3_init", "user_code", "webserver", "daemon"}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_has_every_service_and_builds_from_existing_files(compose, compose_gpu):
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES, f"missing: {REQUIRED_SERVICES - set(services)}"
    for file_name, data in (("compose.yaml", compose), ("compose.gpu.yaml", compose_gpu)):
        for name, service in data["services"].items():
            build = service.get("build")
            if build:
                context = (DOCKER / build["context"]).resolve()
                assert context == REPO, f"{file_name}:{name} must build from the repository root"
                assert (context / build["dockerfile"]).is_file(), f"{file_name}:{name}: {build['dockerfile']} missing"


def test_every_mounted_file_and_named_volume_exists(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses volume {source} not declared under volumes:"
            assert target.startswith("/")


def test_dagster_processes_share_instance_config_and_logs(compose):
    for name in ("user_code", "webserver", "daemon"):
        service = compose["services"][name]
        home = environment(service)["DAGSTER_HOME"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert mounts.get(f"{home}/dagster.yaml") == "./dagster.yaml", f"{name} must load docker/dagster.yaml"
        assert mounts.get("/opt/dagster/logs") == "dagster_logs", f"{name} must share the compute logs"
    assert "castlora_data" in {m.split(":")[0] for m in compose["services"]["user_code"]["volumes"]}


def test_ports_line_up_between_workspace_user_code_and_webserver(compose):
    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text(encoding="utf-8"))
    [entry] = workspace["load_from"]
    server = entry["grpc_server"]
    assert server["location_name"] == "castlora"
    services = compose["services"]
    assert server["host"] in services and server["host"] == "user_code"
    user_cmd = services["user_code"]["command"]
    assert int(flag_value(user_cmd, "-p")) == server["port"] == GRPC_PORT
    assert flag_value(user_cmd, "-m") == "assets.definitions"
    assert str(GRPC_PORT) in [str(p) for p in services["user_code"]["expose"]]
    web_cmd = services["webserver"]["command"]
    assert web_cmd[0] == "dagster-webserver" and flag_value(web_cmd, "-p") == "3000"
    assert any(str(p).endswith("3000:3000") for p in services["webserver"]["ports"]), "publish the UI on 3000"
    for name in ("webserver", "daemon"):
        command = " ".join(services[name]["command"])
        workspace_path = re.search(r"-w (\S+)", command).group(1)
        mounts = {m.split(":")[1]: m.split(":")[0] for m in services[name]["volumes"]}
        assert mounts.get(workspace_path) == "./workspace.yaml", f"{name} reads {workspace_path}, not mounted"
    assert "dagster-daemon run" in " ".join(services["daemon"]["command"])


def test_dependencies_wait_for_health_and_health_is_defined(compose):
    services = compose["services"]
    for name in ("user_code", "webserver", "daemon"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["user_code"]["condition"] == "service_healthy", name
    assert services["user_code"]["depends_on"]["s3_init"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dep, rule in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy: {dep} needs a healthcheck"
                )


def project_env_names() -> set[str]:
    """CASTLORA_*/AWS_* names the code location reads (string literals in assets/ and resources/)."""
    names: set[str] = set()
    for package in ("assets", "resources"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(re.findall(r"\b(?:CASTLORA|AWS)_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    return names


def test_services_define_the_env_vars_they_read(compose, instance_yaml):
    services = compose["services"]
    user_env = environment(services["user_code"])
    missing = project_env_names() - set(user_env)
    assert not missing, f"user_code does not set {sorted(missing)} (read by assets/ or resources/)"
    assert set(user_env) >= S3_VARS | AWS_VARS
    assert set(environment(services["s3_init"])) >= S3_VARS | AWS_VARS
    instance_vars = set(re.findall(r"\{env: (\w+)\}", (DOCKER / "dagster.yaml").read_text(encoding="utf-8")))
    assert instance_vars >= POSTGRES_VARS
    for name in ("user_code", "webserver", "daemon"):
        absent = instance_vars - set(environment(services[name]))
        assert not absent, f"{name} loads docker/dagster.yaml but does not set {sorted(absent)}"
    pg = environment(services["postgres"])
    for var in ("USER", "PASSWORD", "DB"):
        assert pg[f"POSTGRES_{var}"] == user_env[f"DAGSTER_POSTGRES_{var}"], f"postgres and Dagster disagree on {var}"
    assert user_env["DAGSTER_POSTGRES_HOST"] == "postgres"
    # The settings assets/instance.py reads mirror the static instance config.
    assert user_env["CASTLORA_RUN_RETRIES"].endswith(f":-{instance_yaml['run_retries']['max_retries']}}}")
    endpoint = re.search(r"http://(\w+):(\d+)", user_env["CASTLORA_S3_ENDPOINT_URL"])
    assert endpoint and endpoint.group(1) in services, "the S3 endpoint must be the compose s3 service"
    assert endpoint.group(2) == environment(services["s3"])["MOTO_PORT"]


def test_every_interpolation_has_a_default_so_up_works_without_a_dotenv():
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8").replace("$$", "")
    bare = [m for m in re.findall(r"\$\{([^}]*)\}", text) if ":-" not in m]
    assert not bare, f"interpolations without a default: {bare}"


def test_daemon_sets_the_gpu_pool_from_gpu_slots(compose):
    command = compose["services"]["daemon"]["command"][-1]
    assert re.search(
        r'dagster instance concurrency set gpu "\$\$\{CASTLORA_GPU_SLOTS\}" && exec dagster-daemon', command
    )
    assert "CASTLORA_GPU_SLOTS" in environment(compose["services"]["daemon"])


def test_gpu_override_gives_user_code_one_nvidia_gpu_and_the_cuda_image(compose_gpu):
    user_code = compose_gpu["services"]["user_code"]
    assert user_code["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    [device] = user_code["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert environment(user_code)["CASTLORA_DEVICE"].endswith("cuda}")


def test_workspace_yaml_is_a_loadable_grpc_workspace():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text(encoding="utf-8"))
    ensure_workspace_config(workspace, str(DOCKER / "workspace.yaml"))


# --- the instance config ---------------------------------------------------------------------------------------

DUMMY_ENV = {name: f"dummy-{name.lower()}" for name in POSTGRES_VARS}


def validate_instance(config_dir: Path, monkeypatch) -> dict:
    """Validate like DagsterInstance would, without connecting: the instance schema, then each class's schema."""
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    config, custom_class = dagster_instance_config(str(config_dir))
    assert custom_class is None
    resolved = process_config(dagster_instance_config_schema(), config)  # resolves {env: ...} sources
    if not resolved.success:
        raise DagsterInvalidConfigError("instance config", resolved.errors, config)
    for key in ("run_coordinator", "run_launcher", "compute_logs"):
        entry = config[key]
        klass = class_from_code_pointer(entry["module"], entry["class"])
        result = process_config(klass.config_type(), entry.get("config") or {})
        if not result.success:
            raise DagsterInvalidConfigError(f"{key} config", result.errors, entry)
    return resolved.value


def test_instance_config_validates_against_dagsters_schema(tmp_path, monkeypatch):
    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "dagster.yaml")
    value = validate_instance(tmp_path, monkeypatch)
    db = value["storage"]["postgres"]["postgres_db"]
    assert (
        db["hostname"] == DUMMY_ENV["DAGSTER_POSTGRES_HOST"]
        and db["password"] == DUMMY_ENV["DAGSTER_POSTGRES_PASSWORD"]
    )
    assert value["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert value["run_launcher"]["class"] == "DefaultRunLauncher"
    assert value["concurrency"]["pools"]["default_limit"] >= 1
    assert value["run_retries"]["enabled"] and value["run_retries"]["max_retries"] >= 1
    assert value["telemetry"]["enabled"] is False


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["storage"]["postgres"]["postgres_db"].update(hostnme="x"), "hostnme"),
        (lambda c: c["run_launcher"].update(config={"no_such_field": 1}), "no_such_field"),
        (lambda c: c["concurrency"]["pools"].update(default_limit="one"), "'one' is not a int"),
    ],
)
def test_instance_validation_rejects_a_broken_config(tmp_path, monkeypatch, instance_yaml, edit, message):
    broken = json.loads(json.dumps(instance_yaml))
    edit(broken)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    with pytest.raises((DagsterInvalidConfigError, CheckError), match=message):
        validate_instance(tmp_path, monkeypatch)


def test_instance_validation_needs_the_postgres_env_vars(tmp_path, monkeypatch):
    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "dagster.yaml")
    for name in DUMMY_ENV:
        monkeypatch.setenv(name, "x")
    monkeypatch.delenv("DAGSTER_POSTGRES_PASSWORD")
    config, _ = dagster_instance_config(str(tmp_path))
    result = process_config(dagster_instance_config_schema(), config)
    assert not result.success
    assert "DAGSTER_POSTGRES_PASSWORD" in str(result.errors)


def test_s3_init_creates_the_bucket_once_on_a_moto_server(compose):
    """Run the compose one-shot's script and the s3 healthcheck URL against a local moto S3 server."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        health = compose["services"]["s3"]["healthcheck"]["test"][-1]
        url = re.search(r"'(http://localhost:\d+/[^']*)'", health).group(1)
        path = url.split(str(environment(compose["services"]["s3"])["MOTO_PORT"]), 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            assert response.status == 200, f"the s3 healthcheck path {path} does not answer"
        service = compose["services"]["s3_init"]
        script = service["command"][-1]
        env = {
            **{k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in environment(service).items()},
            "CASTLORA_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "PATH": "/usr/bin:/bin",
        }
        for _ in range(2):  # idempotent: a restarted stack must not fail on an existing bucket
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert f"bucket ready: {env['CASTLORA_S3_BUCKET']}" in done.stdout
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["CASTLORA_S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [env["CASTLORA_S3_BUCKET"]]
    finally:
        server.stop()
