"""Kubernetes: render, with dagster-k8s's own code, the Job each asset step would get, and check the Helm values.

No cluster and no `helm` binary here: the step Job is built the way dagster_k8s's K8sStepHandler builds it
(run launcher context from the Helm values, the code location's env/secrets, the executor's run config, the
step's `dagster-k8s/config` tag, the per-step override), then `construct_dagster_k8s_job` makes the manifest.
"""

import json
import re
from pathlib import Path

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster._config import process_config
from dagster._core.execution.api import create_execution_plan
from dagster_k8s import k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_k8s_job_name,
    get_user_defined_k8s_config,
)

from assets.executors import EXECUTOR_ENV, executor_for, executor_from_env

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
RELEASE_FULLNAME = "castlora-dagster"  # the chart's `dagster.fullname` for release `castlora`
GPU = "nvidia.com/gpu"
HELM_TO_K8S_CONFIG = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


@pytest.fixture(scope="module")
def steps() -> dict:
    """Step key -> (pool, tags) for the castlora job, as the executor sees them (execution plan step tags)."""
    from assets.definitions import defs  # the real code location (imports torch: once per module)

    plan = create_execution_plan(defs.resolve_job_def("castlora_pair"))
    return {step.key: (step.pool, dict(step.tags)) for step in plan.steps}


@pytest.fixture(scope="module")
def executor_config() -> dict:
    run_config = yaml.safe_load((K8S / "run_config.yaml").read_text(encoding="utf-8"))
    result = process_config(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    assert result.success, f"deploy/k8s/run_config.yaml: {result.errors}"
    return result.value


def image_of(deployment: dict) -> str:
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def render_step_job(step_key: str, tags: dict, helm_values: dict, deployment: dict, executor_config: dict) -> dict:
    """The step Job manifest, following K8sStepHandler._get_container_context and launch_step."""
    launcher = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s_config = {HELM_TO_K8S_CONFIG[k]: v for k, v in launcher.get("runK8sConfig", {}).items()}
    context = K8sContainerContext(
        image_pull_policy=launcher["imagePullPolicy"],
        env_config_maps=launcher["envConfigMaps"],
        env_secrets=[s["name"] for s in launcher["envSecrets"]],
        env_vars=launcher["envVars"],
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(run_k8s_config),
    )
    # includeConfigInLaunchedRuns: the code location's env and secrets follow its runs and steps.
    context = context.merge(
        K8sContainerContext(env=deployment["env"], env_secrets=[s["name"] for s in deployment["envSecrets"]])
    )
    context = context.merge(
        K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor_config.get("step_k8s_config", {}))
        )
    )
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    per_step = executor_config.get("per_step_k8s_config", {}).get(step_key, {})
    context = context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(per_step)))
    job_config = DagsterK8sJobConfig(
        job_image=image_of(deployment),
        dagster_home=helm_values["global"]["dagsterHome"],
        instance_config_map=f"{RELEASE_FULLNAME}-instance",
        postgres_password_secret=helm_values["global"]["postgresqlSecretName"],
    )
    job_name = f"dagster-step-{get_k8s_job_name('0123456789abcdef', step_key)}"
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name=job_name,
        pod_name=job_name,
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": "castlora_pair", "dagster/op": step_key},
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


@pytest.fixture(scope="module")
def manifests(steps, helm_values, user_deployment, executor_config) -> dict:
    return {
        key: render_step_job(key, tags, helm_values, user_deployment, executor_config)
        for key, (_pool, tags) in steps.items()
    }


def container(manifest: dict) -> dict:
    [main] = manifest["spec"]["template"]["spec"]["containers"]
    return main


def test_every_asset_has_a_step_and_gpu_assets_are_in_the_gpu_pool(steps):
    gpu = {key for key, (pool, _) in steps.items() if pool == "gpu"}
    assert {"segments", "class_images", "lora", "samples", "iteration", "evaluation"} <= gpu
    assert {"references", "captions", "segmix_bank"}.isdisjoint(gpu)
    assert all(pool in (None, "gpu") for pool, _ in steps.values())


def test_gpu_steps_get_one_gpu_and_the_toleration(steps, manifests):
    gpu_steps = [key for key, (pool, _) in steps.items() if pool == "gpu"]
    assert gpu_steps
    for key in gpu_steps:
        spec = manifests[key]["spec"]["template"]["spec"]
        resources = container(manifests[key])["resources"]
        assert resources["limits"][GPU] == "1", f"{key}: {resources}"
        assert resources["requests"][GPU] == "1", f"{key}: {resources}"
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], key


def test_cpu_steps_get_no_gpu_anywhere(steps, manifests):
    cpu_steps = [key for key, (pool, _) in steps.items() if pool != "gpu"]
    assert {"references", "captions", "segmix_bank"} <= set(cpu_steps)
    for key in cpu_steps:
        assert GPU not in json.dumps(manifests[key]), f"{key} would ask for or tolerate a GPU"
    for key in ("references", "captions", "segmix_bank"):
        requests = container(manifests[key])["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], key


def test_step_pods_run_the_code_location_image_with_its_env_and_secrets(manifests, user_deployment, helm_values):
    for key, manifest in manifests.items():
        main = container(manifest)
        assert main["image"] == image_of(user_deployment)
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env[EXECUTOR_ENV] == "k8s", "the run worker must pick the k8s_job_executor too"
        assert env["DAGSTER_HOME"] == helm_values["global"]["dagsterHome"]
        assert {"CASTLORA_S3_BUCKET", "CASTLORA_S3_PREFIX", "CASTLORA_S3_ENDPOINT_URL"} <= set(env), key
        secrets = {source["secretRef"]["name"] for source in main["envFrom"] if "secretRef" in source}
        assert {"castlora-s3", "castlora-api-keys"} <= secrets, key
        labels = manifest["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "castlora", "step_k8s_config from run_config.yaml"
        assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400


def test_per_step_override_deep_merges_and_keeps_the_gpu(manifests):
    resources = container(manifests["lora"])["resources"]
    assert resources["limits"]["memory"] == "96Gi", "run_config.yaml's per_step_k8s_config for lora"
    assert resources["limits"][GPU] == "1", "a memory override must not drop the GPU"
    assert container(manifests["samples"])["resources"]["limits"]["memory"] == "64Gi"


def test_a_malformed_k8s_tag_is_refused_by_dagster_k8s():
    with pytest.raises(dg.DagsterInvalidConfigError, match="dagster-k8s/config"):
        get_user_defined_k8s_config({"dagster-k8s/config": json.dumps({"container_confg": {}})})


def test_executor_run_config_validates_and_typos_fail(executor_config):
    assert executor_config["max_concurrent"] >= 1
    result = process_config(k8s_job_executor.config_schema.config_type, {"max_concurent": 4})
    assert not result.success and "max_concurent" in str(result.errors)


def test_executor_choice_from_env():
    assert executor_for(None) is dg.multiprocess_executor
    assert executor_from_env({}) is dg.multiprocess_executor
    assert executor_from_env({EXECUTOR_ENV: " "}) is dg.multiprocess_executor
    assert executor_for("in_process") is dg.in_process_executor
    assert executor_from_env({EXECUTOR_ENV: "K8S"}) is k8s_job_executor
    with pytest.raises(ValueError, match="CASTLORA_EXECUTOR='celery' is not an executor; use one of multiprocess"):
        executor_for("celery")
    # The code location uses it: multiprocess here (no CASTLORA_EXECUTOR in the test environment).
    from assets.definitions import defs

    assert defs.resolve_job_def("castlora_pair").executor_def is dg.multiprocess_executor


# --- the Helm values --------------------------------------------------------------------------------------------


def test_user_deployment_serves_the_same_module_and_port_as_the_images(user_deployment, compose):
    user_code = compose["services"]["user_code"]
    command = user_code["command"]
    assert user_deployment["dagsterApiGrpcArgs"] == ["-m", command[command.index("-m") + 1]]
    assert user_deployment["port"] == int(command[command.index("-p") + 1])
    assert user_deployment["includeConfigInLaunchedRuns"]["enabled"] is True


def test_helm_image_is_the_cuda_build_of_the_compose_image(user_deployment, compose, compose_gpu):
    compose_cpu_image = re.search(r":-([^}]+)\}", compose["services"]["user_code"]["image"]).group(1)
    compose_gpu_image = re.search(r":-([^}]+)\}", compose_gpu["services"]["user_code"]["image"]).group(1)
    name = compose_cpu_image.split(":")[0]
    assert compose_gpu_image.split(":")[0] == name
    assert user_deployment["image"]["repository"].rsplit("/", 1)[-1] == name
    assert str(user_deployment["image"]["tag"]).endswith(compose_gpu_image.split(":")[1]), "the CUDA variant"


def test_helm_env_names_match_compose(user_deployment, compose):
    helm_env = {e["name"]: e["value"] for e in user_deployment["env"]}
    compose_env = compose["services"]["user_code"]["environment"]
    for name in helm_env:
        assert name in compose_env, f"{name} is set for Kubernetes but not in docker/compose.yaml"
    for name in ("CASTLORA_S3_BUCKET", "CASTLORA_S3_PREFIX", "CASTLORA_S3_ENDPOINT_URL", "CASTLORA_PRESET"):
        assert name in helm_env, f"values.yaml does not set {name}"
    assert helm_env[EXECUTOR_ENV] == "k8s"
    # Credentials only through secrets: never a literal in values.yaml.
    assert not {n for n in helm_env if n.startswith("AWS_") or n.endswith(("_KEY", "_PASSWORD"))}
    text = (K8S / "values.yaml").read_text(encoding="utf-8")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"):
        assert re.search(rf"create secret generic castlora-\S+ .*{name}=", text, re.S), f"document {name}'s secret"


def test_helm_instance_settings_match_the_compose_instance(helm_values, instance_yaml):
    assert helm_values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    assert launcher["loadInclusterConfig"] is True
    for helm_key in launcher.get("runK8sConfig", {}):
        assert helm_key in HELM_TO_K8S_CONFIG, f"unknown runK8sConfig key {helm_key}"
    daemon = helm_values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runRetries"]["maxRetries"] == instance_yaml["run_retries"]["max_retries"]
    assert (
        daemon["runRetries"]["retryOnAssetOrOpFailure"] == instance_yaml["run_retries"]["retry_on_asset_or_op_failure"]
    )
    concurrency = helm_values["concurrency"]
    assert concurrency["enabled"] is True
    assert concurrency["pools"]["defaultLimit"] == instance_yaml["concurrency"]["pools"]["default_limit"]
    assert concurrency["runs"]["maxConcurrentRuns"] == instance_yaml["concurrency"]["runs"]["max_concurrent_runs"]
    assert helm_values["telemetry"]["enabled"] is False
    assert helm_values["postgresql"]["enabled"] is True
    assert helm_values["generatePostgresqlPasswordSecret"] is False, "the password comes from a secret"
    assert "postgresqlPassword" not in helm_values["postgresql"]
