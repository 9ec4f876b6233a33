"""The files in cluster/ are valid for the tools that read them: Ray Serve's own schema for the Serve
configs (and the RayService's serveConfigV2 is the same application as cluster/serve.yaml), the cluster
launcher's own validator for ray-cluster.yaml, `ray start`'s own option parser for every set of Ray start
flags, KubeRay's field names for the RayJob/RayService, and raylign's own CLI parser and config loader for
every `raylign ...` command in them. A key renamed in any of these places fails a test (shown by renaming
one in a copy)."""

from __future__ import annotations

import copy
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


class InvalidClusterFile(Exception):
    """A cluster/ file that the tool reading it would reject (the message names the file and the tool)."""


def _load(name: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidClusterFile(f"{name}: not valid YAML: {exc}") from None


# ---- Ray Serve --------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (Optional[X], List[X], Union[Dict, X], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys of `data` that are no field of `model` (recursively into nested models). Serve's schemas
    ignore unknown keys, so a misspelt optional key (`autoscale_config`) would silently do nothing."""
    if not isinstance(data, dict):
        return []
    fields = {name: f for name, f in model.model_fields.items()}
    fields |= {f.alias: f for f in model.model_fields.values() if f.alias}
    found = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            found.append(f"{where}{key}")
            continue
        for sub in _models_in(field.annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                found += unknown_keys(sub, item, f"{where}{key}.{i}." if isinstance(value, list) else f"{where}{key}.")
    return found


def validate_serve_config(name: str, data: Any) -> Any:
    """A Serve config file as `serve run`/`serve deploy`/KubeRay read it, and raylign's app args."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from raylign.serving.settings import ServeSettings

    try:
        config = ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise InvalidClusterFile(f"{name}: Ray Serve's ServeDeploySchema rejects it: {exc}") from None
    unknown = unknown_keys(ServeDeploySchema, data)
    if unknown:
        raise InvalidClusterFile(f"{name}: keys Ray Serve's ServeDeploySchema does not know: {unknown}")
    for app in config.applications:
        if app.import_path != "raylign.serving:app_builder":
            raise InvalidClusterFile(f"{name}: application {app.name} is not raylign's ({app.import_path})")
        try:  # what app_builder validates, without loading the model
            ServeSettings.model_validate({"require_api_key": True, **app.args})
        except ValidationError as exc:
            raise InvalidClusterFile(f"{name}: raylign's ServeSettings rejects the app args: {exc}") from None
    return config


# ---- raylign commands and `ray start` flags ---------------------------------------------------------


def validate_raylign_command(name: str, command: str):
    """A `raylign train ...` command line, parsed by raylign's CLI parser and its config loaded with the
    overrides: a renamed config key is a ConfigError here as it would be on the cluster."""
    from raylign.cli import build_parser, cmd_train
    from raylign.config import ConfigError, load_config

    argv = shlex.split(command)
    if argv[:1] != ["raylign"]:
        raise InvalidClusterFile(f"{name}: the command does not start with raylign: {command!r}")
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise InvalidClusterFile(f"{name}: raylign's CLI parser rejects {argv[1:]}") from None
    if args.func is not cmd_train:
        raise InvalidClusterFile(f"{name}: expected `raylign train`, got `raylign {args.command}`")
    try:
        return load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        raise InvalidClusterFile(f"{name}: raylign's config loader rejects the entrypoint: {exc}") from None


def validate_ray_start_args(name: str, args: list[str]) -> dict[str, Any]:
    """Flags for `ray start`, parsed by its own click command (a renamed flag is click's NoSuchOption)."""
    import click
    from ray.scripts.scripts import start

    try:
        return start.make_context("start", list(args)).params
    except click.ClickException as exc:
        raise InvalidClusterFile(f"{name}: `ray start` rejects {args}: {exc.format_message()}") from None


def _ray_start_flags(command: str) -> list[str] | None:
    """The flags of a `[VAR=value ...] ray start ...` shell command, None for any other command."""
    argv = shlex.split(command)
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        argv.pop(0)
    return argv[2:] if argv[:2] == ["ray", "start"] else None


def header_commands(text: str, start: str) -> list[str]:
    """Commands in a file's header comment that begin with `start`, backslash continuations joined."""
    lines = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#")]
    found, current = [], None
    for line in lines:
        if current is None and line.startswith(start):
            current = ""
        if current is not None:
            body = line.split("  #")[0].rstrip()
            current += body.removesuffix("\\") + " "
            if not body.endswith("\\"):
                found.append(current.strip())
                current = None
    return found


# ---- the cluster launcher ---------------------------------------------------------------------------


def validate_ray_cluster(name: str, text: str) -> dict[str, Any]:
    """As `ray up` does: prepare_config (the local provider's node type, defaults), then validate_config
    (ray-schema.json), then every `ray start` in the start commands through `ray start`'s parser."""
    import jsonschema  # type: ignore[import-untyped]
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name, text)
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, KeyError) as exc:
        message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        raise InvalidClusterFile(f"{name}: the cluster launcher's validate_config rejects it: {message}") from None
    starts = [flags for cmd in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
              if (flags := _ray_start_flags(cmd)) is not None]
    if len(starts) != 2:
        raise InvalidClusterFile(f"{name}: expected one `ray start` for the head and one for the workers")
    for flags in starts:
        validate_ray_start_args(name, flags)
    for cmd in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        if _ray_start_flags(cmd) is not None and not cmd.startswith("RAY_AUTH_MODE=token "):
            raise InvalidClusterFile(f"{name}: `{cmd}` starts Ray without token authentication")
    return prepared


# ---- KubeRay ---------------------------------------------------------------------------------------

# Field names of KubeRay's ray.io/v1 types (KubeRay API reference, v1.5-v1.6:
# https://ray-project.github.io/kuberay/reference/api/); a key outside these is a typo the API server
# would drop or reject.
KUBERAY_FIELDS = {
    "RayJob": {"apiVersion", "kind", "metadata", "spec"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                   "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
                   "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
                   "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "RayServiceSpec": {"deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig",
                       "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold", "upgradeStrategy"},
    "RayClusterSpec": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                       "workerGroupSpecs"},
    "AuthOptions": {"mode"},
    "HeadGroupSpec": {"enableIngress", "headService", "rayStartParams", "serviceType", "template"},
    "WorkerGroupSpec": {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                        "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"},
}
CONTAINER_LIMITS = {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"}


def _check_fields(name: str, kind: str, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidClusterFile(f"{name}: {where} must be a mapping ({kind})")
    unknown = sorted(set(data) - KUBERAY_FIELDS[kind])
    if unknown:
        raise InvalidClusterFile(f"{name}: {where} has keys KubeRay's {kind} does not: {unknown}")


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _check_group(name: str, kind: str, group: dict[str, Any], where: str) -> float:
    """One head or worker group: its fields, its `ray start` params, its pod template; returns the CPUs
    Ray sees on one of its pods (num-cpus if set, else the container's CPU limit)."""
    _check_fields(name, kind, group, where)
    params = group.get("rayStartParams", {})
    if not all(isinstance(v, str) for v in params.values()):  # a map[string]string in the CRD
        raise InvalidClusterFile(f"{name}: {where}.rayStartParams values must be strings: {params}")
    validate_ray_start_args(name, [f"--{key}={value}" for key, value in params.items()])
    pod = group["template"]["spec"]
    volumes = {v["name"] for v in pod.get("volumes", [])}
    (container,) = pod["containers"]  # the Ray container (KubeRay takes the first)
    if not container.get("name") or not container.get("image"):
        raise InvalidClusterFile(f"{name}: {where}'s container needs a name and an image")
    limits = container.get("resources", {}).get("limits", {})
    if not set(limits) <= CONTAINER_LIMITS:
        raise InvalidClusterFile(f"{name}: {where}'s container limits {sorted(limits)} are not {CONTAINER_LIMITS}")
    missing = {m["name"] for m in container.get("volumeMounts", [])} - volumes
    if missing:
        raise InvalidClusterFile(f"{name}: {where} mounts volumes it does not define: {missing}")
    return _cpus(params["num-cpus"]) if "num-cpus" in params else _cpus(limits["cpu"])


def validate_ray_cluster_spec(name: str, spec: Any, where: str) -> float:
    """A RayClusterSpec with token auth; returns the worker CPUs the cluster starts with."""
    _check_fields(name, "RayClusterSpec", spec, where)
    _check_fields(name, "AuthOptions", spec.get("authOptions"), f"{where}.authOptions")
    if spec["authOptions"].get("mode") != "token":
        raise InvalidClusterFile(f"{name}: {where}.authOptions.mode must be 'token'")
    if tuple(int(x) for x in str(spec["rayVersion"]).split(".")[:2]) < (2, 52):
        raise InvalidClusterFile(f"{name}: token authentication needs rayVersion >= 2.52")
    _check_group(name, "HeadGroupSpec", spec["headGroupSpec"], f"{where}.headGroupSpec")
    cpus = 0.0
    for i, group in enumerate(spec["workerGroupSpecs"]):
        cpus += group["minReplicas"] * _check_group(name, "WorkerGroupSpec", group, f"{where}.workerGroupSpecs.{i}")
    return cpus


def validate_rayjob(name: str, text: str):
    """The RayJob: KubeRay's fields, its runtime env through Ray's RuntimeEnv, its entrypoint through
    raylign's CLI and config loader, and the actors' CPUs within the workers' minimum."""
    from ray.runtime_env import RuntimeEnv

    job = _load(name, text)
    _check_fields(name, "RayJob", job, "the top level")
    if (job["apiVersion"], job["kind"]) != ("ray.io/v1", "RayJob"):
        raise InvalidClusterFile(f"{name}: not a ray.io/v1 RayJob")
    spec = job["spec"]
    _check_fields(name, "RayJobSpec", spec, "spec")
    if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        raise InvalidClusterFile(f"{name}: unknown submissionMode {spec['submissionMode']}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as exc:
        raise InvalidClusterFile(f"{name}: Ray's RuntimeEnv rejects runtimeEnvYAML: {exc}") from None
    # RuntimeEnv takes unknown keys as plugin names; raylign's jobs use none, so one is a typo
    plugins = sorted(set(runtime_env) - RuntimeEnv.known_fields)
    if plugins:
        raise InvalidClusterFile(f"{name}: Ray's RuntimeEnv rejects runtimeEnvYAML keys {plugins} "
                                 f"(not among RuntimeEnv.known_fields; no such plugin is installed)")
    worker_cpus = validate_ray_cluster_spec(name, spec["rayClusterSpec"], "spec.rayClusterSpec")
    config = validate_raylign_command(name, spec["entrypoint"])
    r = config.resources
    actor_cpus = (r.learners * r.cpus_per_learner + r.rollout_workers * r.cpus_per_rollout_worker
                  + r.reward_workers * r.cpus_per_reward_worker)
    if actor_cpus > worker_cpus:
        raise InvalidClusterFile(f"{name}: the run asks for {actor_cpus} CPUs, the workers have {worker_cpus}")
    return config


def validate_rayservice(name: str, text: str, serve_name: str, serve_text: str):
    """The RayService: KubeRay's fields, and serveConfigV2 valid for Serve and equal to cluster/serve.yaml."""
    service = _load(name, text)
    _check_fields(name, "RayJob", service, "the top level")  # the same four top-level keys
    if (service["apiVersion"], service["kind"]) != ("ray.io/v1", "RayService"):
        raise InvalidClusterFile(f"{name}: not a ray.io/v1 RayService")
    spec = service["spec"]
    _check_fields(name, "RayServiceSpec", spec, "spec")
    if not isinstance(spec["serveConfigV2"], str):  # KubeRay takes the Serve config as one string
        raise InvalidClusterFile(f"{name}: spec.serveConfigV2 must be a YAML string (`serveConfigV2: |`)")
    inner = _load(f"{name} serveConfigV2", spec["serveConfigV2"])
    config = validate_serve_config(f"{name} serveConfigV2", inner)
    serve_data = _load(serve_name, serve_text)
    reference = validate_serve_config(serve_name, serve_data)
    if inner != serve_data or config.model_dump(warnings=False) != reference.model_dump(warnings=False):
        raise InvalidClusterFile(f"{name}: serveConfigV2 is not the application of {serve_name}")
    validate_ray_cluster_spec(name, spec["rayClusterConfig"], "spec.rayClusterConfig")
    return config


def _text(name: str) -> str:
    return (CLUSTER / name).read_text(encoding="utf-8")


# ---- the committed files ----------------------------------------------------------------------------


def test_serve_yaml_is_a_strictly_valid_serve_config():
    config = validate_serve_config("serve.yaml", _load("serve.yaml", _text("serve.yaml")))
    assert [app.name for app in config.applications] == ["raylign"]


def test_rayservice_serves_the_same_application_as_serve_yaml():
    config = validate_rayservice("kuberay-rayservice.yaml", _text("kuberay-rayservice.yaml"),
                                 "serve.yaml", _text("serve.yaml"))
    (app,) = config.applications
    assert app.args["api_key_env"] == "RAYLIGN_API_KEY"
    # every Ray container gets the key from the Secret the replicas read it from
    spec = yaml.safe_load(_text("kuberay-rayservice.yaml"))["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert [e["name"] for e in container["env"]] == ["RAYLIGN_API_KEY"]


def test_rayjob_is_a_raylign_grpo_run_kuberay_and_raylign_accept():
    config = validate_rayjob("kuberay-rayjob.yaml", _text("kuberay-rayjob.yaml"))
    assert config.algorithm == "grpo" and config.recipe == "grpo"
    assert config.resources.learners == 2 and config.resources.learner_placement == "spread"
    assert config.output.storage == "/mnt/raylign/runs"  # pods share no filesystem
    # the GPU limits are there, commented, for the user to switch on
    assert "# nvidia.com/gpu: 1" in _text("kuberay-rayjob.yaml")


def test_ray_cluster_yaml_passes_the_launchers_validator_and_its_commands_parse():
    prepared = validate_ray_cluster("ray-cluster.yaml", _text("ray-cluster.yaml"))
    assert prepared["provider"]["type"] == "local"
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(prepared["provider"]["worker_ips"])
    (submit,) = header_commands(_text("ray-cluster.yaml"), "ray job submit")
    config = validate_raylign_command("ray-cluster.yaml header", submit.split(" -- ", 1)[1])
    assert config.algorithm == "grpo" and config.resources.rollout_workers == 2


def test_every_cluster_file_has_a_usage_header():
    for path in sorted(CLUSTER.glob("*.yaml")):
        head = path.read_text(encoding="utf-8").splitlines()[:3]
        assert all(line.startswith("#") for line in head), f"{path.name} starts without a header comment"


# ---- a renamed key fails ----------------------------------------------------------------------------

RENAMES = [
    # file, old, new (first occurrence), which check catches it
    ("serve.yaml", "import_path:", "import_pth:", "ServeDeploySchema rejects"),
    ("serve.yaml", "autoscaling_config:", "autoscale_config:", "ServeDeploySchema does not know"),
    ("serve.yaml", "max_batch_size:", "max_batchsize:", "ServeSettings rejects"),
    ("kuberay-rayservice.yaml", "target_ongoing_requests:", "target_requests:", "does not know"),
    ("kuberay-rayservice.yaml", "rayClusterConfig:", "rayClusterSpec:", "RayServiceSpec does not"),
    ("kuberay-rayjob.yaml", "resources.learners=2", "resources.learner=2", "config loader rejects"),
    ("kuberay-rayjob.yaml", "workerGroupSpecs:", "workerGroupSpec:", "RayClusterSpec does not"),
    ("kuberay-rayjob.yaml", "dashboard-host:", "dashboard-hostname:", "`ray start` rejects"),
    ("kuberay-rayjob.yaml", "runtimeEnvYAML: |\n    env_vars:", "runtimeEnvYAML: |\n    env_var:", "RuntimeEnv rejects"),
    ("ray-cluster.yaml", "worker_start_ray_commands:", "worker_start_commands:", "validate_config rejects"),
    ("ray-cluster.yaml", "\n  ssh_user:", "\n  ssh_username:", "validate_config rejects"),
    ("ray-cluster.yaml", "--dashboard-host=", "--dashboard-hostname=", "`ray start` rejects"),
]


def _validate(name: str, text: str) -> None:
    if name == "serve.yaml":
        validate_serve_config(name, _load(name, text))
    elif name == "kuberay-rayservice.yaml":
        validate_rayservice(name, text, "serve.yaml", _text("serve.yaml"))
    elif name == "kuberay-rayjob.yaml":
        validate_rayjob(name, text)
    else:
        validate_ray_cluster(name, text)


@pytest.mark.parametrize(("name", "old", "new", "caught_by"), RENAMES, ids=[f"{r[0]}:{r[2]}" for r in RENAMES])
def test_a_renamed_key_fails_validation(tmp_path, name, old, new, caught_by):
    text = _text(name)
    assert old in text, f"{name} no longer holds {old!r}: update RENAMES"
    renamed = tmp_path / name
    renamed.write_text(text.replace(old, new, 1), encoding="utf-8")  # a copy: cluster/ is untouched
    _validate(name, text)  # the original passes ...
    with pytest.raises(InvalidClusterFile, match=re.escape(caught_by)):  # ... the renamed copy does not
        _validate(name, renamed.read_text(encoding="utf-8"))


def test_serve_yaml_changed_alone_breaks_the_rayservice_equality():
    changed = _text("serve.yaml").replace("max_replicas: 4", "max_replicas: 5", 1)
    with pytest.raises(InvalidClusterFile, match="is not the application of serve.yaml"):
        validate_rayservice("kuberay-rayservice.yaml", _text("kuberay-rayservice.yaml"), "serve.yaml", changed)
