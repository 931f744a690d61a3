"""Shared fixtures for the deployment tests: the parsed compose files, instance config and Helm values."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "k8s"


def load_yaml(path: Path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def compose() -> dict:
    return load_yaml(DOCKER / "compose.yaml")


@pytest.fixture(scope="session")
def compose_gpu() -> dict:
    return load_yaml(DOCKER / "compose.gpu.yaml")


@pytest.fixture(scope="session")
def instance_yaml() -> dict:
    return load_yaml(DOCKER / "dagster.yaml")


@pytest.fixture(scope="session")
def helm_values() -> dict:
    return load_yaml(K8S / "values.yaml")


@pytest.fixture(scope="session")
def user_deployment(helm_values) -> dict:
    deployments = helm_values["dagster-user-deployments"]["deployments"]
    assert [d["name"] for d in deployments] == ["castlora"], "one code location named castlora"
    return deployments[0]
