"""The files in ``cluster/`` and ``configs/gpu-*.yaml`` are valid for the tools that read them,
and ``launch.py --submit`` sends what a cluster needs. Nothing here starts Ray or needs a GPU.

- ``cluster/aws-gpu.yaml`` goes through what ``ray up`` does before it talks to AWS: Ray's own
  ``prepare_config`` (defaults merged) and ``validate_config`` (the JSON schema shipped in the
  installed ray, ``ray/autoscaler/ray-schema.json``).
- ``cluster/rayjob.yaml`` is checked against ``RAYJOB_SCHEMA`` below: KubeRay's RayJob CRD
  (``ray.io/v1``) cannot be fetched here, so the schema encodes, by hand, the fields and types
  the CRD defines (KubeRay v1.x API reference and ``ray-operator/apis/ray/v1/*_types.go``):
  unknown fields are refused where the CRD has a closed field list; required fields are the
  strictest set of any v1 release (older CRDs require ``rayStartParams`` on every group and
  ``minReplicas``/``maxReplicas`` on worker groups); quantities follow Kubernetes' pattern;
  the pod template is checked for what KubeRay and Kubernetes require of containers.
- ``cluster/slurm.sh``: ``bash -n`` and ``shellcheck`` (skipped only if shellcheck is not
  installed: ``apt-get install -y shellcheck``), then a run under stub ``scontrol``/``srun``/
  ``python`` commands that checks what it starts, in what order, and that it cleans up.
- ``configs/gpu-*.yaml``: that every config loads is tests/test_config.py's job; here, that the
  GPU configs really ask for GPUs, bf16 and ZeRO, and fit the clusters defined in ``cluster/``
  (``gpu-1gpu-*``: every role on one GPU, no NCCL).
"""

import copy
import os
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from rlhf_dist import submit
from rlhf_dist.algo.estimators import ESTIMATORS
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.ray_env import WORKER_KEYS

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
GPU_CONFIGS = sorted((ROOT / "configs").glob("gpu-*.yaml"))


def _yaml(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _gpus_needed(cfg) -> float:
    return sum(
        n * g
        for n, g in (
            (cfg.learner.num_workers, cfg.learner.num_gpus),
            (cfg.rollout.num_workers, cfg.rollout.num_gpus),
            (cfg.reward.num_workers, cfg.reward.num_gpus if cfg.reward.model else 0.0),
            (cfg.reference.num_workers, cfg.reference.num_gpus),
        )
    )


def _cpus_needed(cfg) -> float:
    return sum(
        n * c
        for n, c in (
            (cfg.learner.num_workers, cfg.learner.num_cpus),
            (cfg.rollout.num_workers, cfg.rollout.num_cpus),
            (cfg.reward.num_workers, cfg.reward.num_cpus),
            (cfg.reference.num_workers, cfg.reference.num_cpus),
        )
    )


# ----------------------------------------------------------------------------- GPU configs


def test_there_are_gpu_configs_for_one_node_and_for_several():
    names = [p.name for p in GPU_CONFIGS]
    assert "gpu-1node-8gpu.yaml" in names and "gpu-2node.yaml" in names, names


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_config_puts_every_role_on_gpus_with_bf16_and_zero(path):
    cfg = load_config(path)
    assert cfg.run.stage == "ppo"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.learner.zero_stage in (2, 3)
    assert cfg.rollout.num_gpus > 0 and cfg.reference.num_gpus > 0
    # a reward model on GPUs, or (critic-free, a verifiable task) reward functions and no model
    if cfg.reward.model:
        assert cfg.reward.num_gpus > 0
    else:
        assert cfg.reward.function and not ESTIMATORS[cfg.ppo.estimator].needs_critic
    # real Hugging Face ids (org/name), not built-in toy models or earlier stages' outputs
    for source in filter(None, (cfg.model.policy, cfg.reward.model)):
        org, _, name = source.partition("/")
        assert org and name and "/" not in name and ":" not in source, source
    assert "Instruct" in cfg.model.policy
    # a whole number of GPUs, and no more than the nodes (or the GPU) the name promises
    gpus = round(_gpus_needed(cfg), 6)
    assert gpus == int(gpus)
    if "1gpu" in path.name:  # every role shares one GPU: no NCCL (it refuses two ranks on one)
        assert gpus == 1 and cfg.learner.num_workers == 1 and 0 < cfg.learner.num_gpus < 1
        assert cfg.sync.backend in ("object_store", "gloo")
        return
    assert cfg.learner.num_gpus == 1 and cfg.learner.num_workers >= 4
    assert cfg.sync.backend in ("auto", "nccl")
    assert gpus <= (8 if "1node" in path.name else 64)
    if "2node" in path.name:
        assert gpus > 8  # does not fit one 8-GPU node


# ----------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs first

    # the check has teeth: a misspelt node-type field, a non-integer GPU count are refused
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["learner_gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["rollout_gpu"]["resources"]["GPU"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_launcher_has_learner_and_rollout_gpu_types_that_fit_the_gpu_configs():
    raw = _yaml("aws-gpu.yaml")
    types = raw["available_node_types"]
    assert raw["provider"]["type"] == "aws"
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"learner_gpu", "rollout_gpu"} <= set(types)
    for name in ("learner_gpu", "rollout_gpu"):
        assert types[name]["resources"]["GPU"] == 8, name
        assert types[name]["min_workers"] >= 1
    start_gpus = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    start_cpus = sum(t.get("min_workers", 0) * t["resources"].get("CPU", 0) for t in types.values())
    for path in GPU_CONFIGS:
        cfg = load_config(path)
        assert _gpus_needed(cfg) <= start_gpus, path.name
        assert _cpus_needed(cfg) <= start_cpus, path.name
    # the same Ray as here; token auth on every node; the project installed on every node
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in raw[key][-1]
    assert any("-e ~/rlhf_dist" in c for c in raw["setup_commands"])
    assert raw["file_mounts"]["~/rlhf_dist"] == "."


# ----------------------------------------------------------------------------- KubeRay

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_QUANTITY = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
            r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    ]
}
_ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "valueFrom": {
            "type": "object",
            "properties": {
                "secretKeyRef": {
                    "type": "object",
                    "required": ["key"],
                    "properties": {
                        "name": {"type": "string"},
                        "key": {"type": "string"},
                        "optional": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
                "configMapKeyRef": {"type": "object", "required": ["key"]},
                "fieldRef": {"type": "object", "required": ["fieldPath"]},
                "resourceFieldRef": {"type": "object", "required": ["resource"]},
            },
            "additionalProperties": False,
        },
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],  # image: required by KubeRay for Ray containers
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": _ENV_VAR},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {
                    "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "name": {"type": "string", "maxLength": 15},
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                },
                "additionalProperties": False,
            },
        },
        "resources": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
            },
            "additionalProperties": False,
        },
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "properties": {
                    "name": {"type": "string"},
                    "mountPath": {"type": "string"},
                    "readOnly": {"type": "boolean"},
                    "subPath": {"type": "string"},
                },
                "additionalProperties": False,
            },
        },
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "lifecycle": {"type": "object"},
        "securityContext": {"type": "object"},
        "workingDir": {"type": "string"},
    },
    "additionalProperties": False,
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {
            "type": "object",
            "properties": {"labels": _STR_MAP, "annotations": _STR_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}},
                    },
                },
                "nodeSelector": _STR_MAP,
                "tolerations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "key": {"type": "string"},
                            "operator": {"enum": ["Exists", "Equal"]},
                            "value": {"type": "string"},
                            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                        },
                        "additionalProperties": False,
                    },
                },
                "serviceAccountName": {"type": "string"},
                "imagePullSecrets": {"type": "array"},
                "affinity": {"type": "object"},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
    },
    "additionalProperties": False,
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "maxLength": 63,
                    "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                },
                "namespace": {"type": "string"},
                "labels": _STR_MAP,
                "annotations": _STR_MAP,
            },
        },
        "spec": {
            "type": "object",
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": _INT32,
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "authOptions": {
                            "type": "object",
                            "properties": {"mode": {"enum": ["disabled", "token"]}},
                            "additionalProperties": False,
                        },
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object"},
                        "headServiceAnnotations": _STR_MAP,
                        "gcsFaultToleranceOptions": {"type": "object"},
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {
                                "rayStartParams": _STR_MAP,
                                "template": _POD_TEMPLATE,
                                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "enableIngress": {"type": "boolean"},
                                "headService": {"type": "object"},
                            },
                            "additionalProperties": False,
                        },
                        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
                    },
                    "additionalProperties": False,
                },
                "clusterSelector": _STR_MAP,
                "submitterPodTemplate": _POD_TEMPLATE,
                "submitterConfig": {
                    "type": "object",
                    "properties": {"backoffLimit": _INT32},
                    "additionalProperties": False,
                },
                "metadata": _STR_MAP,
                "managedBy": {"type": "string"},
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {
                    "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                },
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
}


def test_rayjob_manifest_matches_the_kuberay_crd():
    job = _yaml("rayjob.yaml")
    jsonschema.validate(job, RAYJOB_SCHEMA)

    # the check has teeth: each of these is something the CRD refuses
    spec = job["spec"]["rayClusterSpec"]
    for mutate in (
        lambda s: s["workerGroupSpecs"][0].update(replicas="1"),
        lambda s: s["workerGroupSpecs"][0].pop("template"),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"),
        lambda s: s.update(workerGroups=[]),
    ):
        bad = copy.deepcopy(job)
        mutate(bad["spec"]["rayClusterSpec"])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, RAYJOB_SCHEMA)
    assert spec  # (unchanged)


def _gpu_limit(group) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayjob_runs_a_gpu_config_that_fits_its_worker_groups():
    job = _yaml("rayjob.yaml")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/rlhf_dist/launch.py"]
    assert argv[argv.index("--address") + 1] == "auto"
    config = argv[argv.index("--config") + 1]
    assert config.startswith("/home/ray/rlhf_dist/")  # where cluster/Dockerfile puts it
    overrides = [a for a in argv[argv.index("--config") + 2 :]]
    cfg = load_config(ROOT / config.removeprefix("/home/ray/rlhf_dist/"), overrides)
    assert Path(cfg.run.dir).is_absolute() and cfg.run.dir.startswith("/mnt/shared/")

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"learner-gpu", "rollout-gpu"} <= set(groups)
    gpus = sum(g["replicas"] * _gpu_limit(g) for g in groups.values())
    assert _gpus_needed(cfg) <= gpus
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"] == res["requests"]  # what KubeRay recommends for Ray pods
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # the same Ray everywhere, token auth on, and a runtime env Ray can merge with launch.py's
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
    assert not set(env_vars) & WORKER_KEYS
    images = {
        c["image"]
        for t in [cluster["headGroupSpec"], *groups.values()]
        for c in t["template"]["spec"]["containers"]
    }
    assert len(images) == 1


def test_dockerfile_uses_this_ray_and_copies_what_the_manifest_runs():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src
    assert "WORKDIR /home/ray/rlhf_dist" in text


# ----------------------------------------------------------------------------- Slurm


def test_slurm_script_parses_and_passes_shellcheck():
    script = CLUSTER / "slurm.sh"
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert os.access(script, os.X_OK)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    p = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


_STUBS = {
    # `scontrol show hostnames <list>`: the allocation's nodes
    "scontrol": 'printf "%s\\n" $STUB_NODES\n',
    # `srun [options] cmd...`: log the options, become the command (so a kill reaches it)
    "srun": textwrap.dedent(
        """\
        opts=()
        while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
        echo "srun ${opts[*]}" >> "$STUB_LOG"
        exec "$@"
        """
    ),
    # the Python of the job's environment: ray CLI, inline helper scripts, launch.py
    "python": textwrap.dedent(
        """\
        if [[ $1 == -m && $2 == ray.scripts.scripts ]]; then
            shift 2
            if [[ " $* " == *" --block "* ]]; then
                trap 'kill $pid 2>/dev/null; echo "ray stopped" >> "$STUB_LOG"; exit 0' TERM
            fi
            echo "ray $* auth=$RAY_AUTH_MODE token=${#RAY_AUTH_TOKEN}" >> "$STUB_LOG"
            if [[ " $* " == *" --block "* ]]; then
                sleep 60 & pid=$!
                wait $pid
            fi
        elif [[ $1 == -c ]]; then
            exec python3 "$@"
        elif [[ $1 == - ]]; then
            # the inline helpers wait, as the real ones do, for the head / for every node
            script=$(cat)
            echo "helper $*" >> "$STUB_LOG"
            pattern="^ray start --head"
            if [[ $script == *ray.nodes* && $3 -gt 1 ]]; then
                pattern="^ray start --block --address"
            fi
            for _ in $(seq 100); do
                grep -q "$pattern" "$STUB_LOG" && exit 0
                sleep 0.1
            done
            exit 1
        else
            echo "launch $* auth=$RAY_AUTH_MODE" >> "$STUB_LOG"; exit "$LAUNCH_RC"
        fi
        """
    ),
}


def _run_slurm(tmp_path, nodes: list[str], *args: str, launch_rc: int = 0):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in _STUBS.items():
        stub = bin_dir / name
        stub.write_text("#!/usr/bin/env bash\n" + body)
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_NODES": " ".join(nodes),
        "STUB_LOG": str(log),
        "LAUNCH_RC": str(launch_rc),
        "PYTHON": str(bin_dir / "python"),
        "HEAD_IP": "10.1.2.3",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "rlhf-dist",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_CPUS_PER_TASK": "64",
    }
    p = subprocess.run(
        ["bash", str(CLUSTER / "slurm.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p, log.read_text().splitlines()


def test_slurm_script_starts_head_then_workers_then_launch_and_stops_its_ray(tmp_path):
    p, calls = _run_slurm(tmp_path, ["gpu01", "gpu02", "gpu03"], "run.steps=5", launch_rc=3)
    assert p.returncode == 3, p.stdout + p.stderr  # launch.py's exit status is the job's
    text = "\n".join(calls)
    head = next(i for i, c in enumerate(calls) if c.startswith("ray start --head"))
    workers = next(i for i, c in enumerate(calls) if c.startswith("ray start --block --address"))
    launch = next(i for i, c in enumerate(calls) if c.startswith("launch "))
    assert head < workers < launch
    assert any(c.startswith("srun --nodes=1 --ntasks=1 --nodelist=gpu01") for c in calls[:head])
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude=gpu01" in text
    assert "--address=10.1.2.3:6379" in calls[workers]
    assert "--num-gpus=8" in calls[head] and "--num-cpus=64" in calls[head]
    assert "auth=token token=64" in calls[head] and "auth=token token=64" in calls[workers]
    assert calls[launch] == (
        f"launch launch.py --address 10.1.2.3:6379 --config configs/gpu-2node.yaml "
        f"run.dir={tmp_path}/runs/rlhf-dist-4242 run.steps=5 auth=token"
    )
    assert calls.count("ray stopped") == 2  # both srun steps were ended on exit


def test_slurm_script_on_one_node_starts_no_worker_step(tmp_path):
    p, calls = _run_slurm(tmp_path, ["gpu01"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert sum(c.startswith("ray start") for c in calls) == 1
    assert calls.count("ray stopped") == 1


# ----------------------------------------------------------------------------- what --submit sends


def test_submit_runtime_env_uploads_the_project_without_venv_or_runs():
    from ray.runtime_env import RuntimeEnv

    renv = submit.runtime_env(pip=False, env_vars={"A": "1"})
    assert renv["working_dir"] == str(ROOT)
    assert {".venv", "runs", "wandb", ".git"} <= set(renv["excludes"])
    assert renv["env_vars"] == {"A": "1"} and "pip" not in renv
    with_pip = submit.runtime_env(pip=True, env_vars={})
    RuntimeEnv(**with_pip)  # Ray's own check of the runtime_env it is sent
    pip = with_pip["pip"]
    names = [p.split("=")[0].split(">")[0].split("[")[0].lower() for p in pip["packages"]]
    assert "transformers" in names and "deepspeed" in names
    assert "torch" not in names and "ray" not in names  # the cluster image's own builds
    pins = submit._constraints(ROOT)
    for spec in pip["packages"]:
        name = spec.split("=")[0].split(">")[0].split("[")[0].lower()
        if name in pins:
            assert spec.endswith(pins[name]), spec  # the versions tested here


def test_submit_entrypoint_is_the_same_launch_py_command_with_overrides_quoted():
    cmd = submit.entrypoint("configs/smoke.yaml", ["run.dir=/a b/c", "run.name=x;y"])
    assert shlex.split(cmd) == [
        "python",
        "launch.py",
        "--address",
        "auto",
        "--config",
        "configs/smoke.yaml",
        "run.dir=/a b/c",
        "run.name=x;y",
    ]


def test_submit_refuses_configs_outside_the_project_and_env_that_clashes(tmp_path):
    assert submit.config_in_project(ROOT / "configs" / "smoke.yaml") == "configs/smoke.yaml"
    with pytest.raises(ConfigError, match="outside the project"):
        submit.config_in_project(tmp_path / "x.yaml")
    assert submit.job_env(["A=1", "B"], {"B": "2"}) == {**submit.JOB_ENV, "A": "1", "B": "2"}
    assert not set(submit.JOB_ENV) & WORKER_KEYS  # Ray refuses to merge clashing keys
    for bad, says in (
        ("TOKENIZERS_PARALLELISM=1", "sets it"),
        ("OMP_WAIT_POLICY=PASSIVE", "sets it"),  # async mode sets it for the workers
        ("C", "not set"),
        ("1x", "NAME"),
    ):
        with pytest.raises(ConfigError, match=says):
            submit.job_env([bad], {})


def test_submit_finds_the_token_where_ray_does(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert submit.auth_token({"HOME": str(home)}) is None  # no token anywhere, mode unset
    (home / ".ray" / "auth_token").write_text("from-home\n")
    file = tmp_path / "tok"
    file.write_text("from-path")
    env = {"HOME": str(home)}
    assert submit.auth_token(env) == "from-home"  # mode unset: sent if one exists
    assert submit.auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(file)}) == "from-path"
    both = {**env, "RAY_AUTH_TOKEN_PATH": str(file), "RAY_AUTH_TOKEN": "from-env"}
    assert submit.auth_token(both) == "from-env"
    assert submit.auth_token({**both, "RAY_AUTH_MODE": "disabled"}) is None
    with pytest.raises(submit.SubmitError, match="no token found"):
        submit.auth_token({"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"})
    with pytest.raises(submit.SubmitError, match="cannot read"):
        submit.auth_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_submit_flags_need_submit_and_exclude_address():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="")
    submit.add_arguments(parser)
    for argv in (["--no-wait"], ["--job-id", "x"], ["--submit", "http://h:8265", "--address", "a"]):
        with pytest.raises(SystemExit):
            submit.check_args(parser, parser.parse_args(argv))
    args = parser.parse_args(["--submit", "http://h:8265", "--no-wait", "--env", "A=1"])
    submit.check_args(parser, args)
    assert args.no_wait and args.env == ["A=1"] and not args.no_pip
    assert submit.pip_wanted(args, {}) and not submit.pip_wanted(args, {submit.NO_PIP_ENV: "1"})


# ----------------------------------------------------------------------------- README


def test_cluster_readme_covers_every_file_and_the_three_steps():
    text = (CLUSTER / "README.md").read_text()
    for path in sorted(CLUSTER.iterdir()):
        if path.name != "README.md" and not path.name.endswith(".dockerignore"):
            assert path.name in text, path.name
    for command in ("--submit", "--no-wait", "--address auto", "ray up", "kubectl apply", "sbatch"):
        assert command in text, command
    assert "RAY_AUTH_MODE=token" in text and "run.dir" in text
