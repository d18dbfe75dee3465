"""Every bad-config rule: one clear message naming the stack, the key path, the value and what is allowed."""
from __future__ import annotations

import pytest

from llm_platform.config import ConfigError
from llm_platform.stack import parse_stack_config
from tests.conftest import stack_values


def model0(values):
    return values["models"][0]


def set_path(values, path, value):
    node = values
    *parents, last = path
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[last] = value
    return values


# (stack, path into the config, bad value, expected message after "stack '<stack>': llm-platform:")
BAD = [
    ("prod", ["namespace"], "AI_Production",
     "namespace: 'AI_Production' is not a valid Kubernetes name (DNS-1123 label"),
    ("prod", ["models"], [], "models: no model is configured; add at least one entry"),
    ("prod", ["models", 0, "replicas"], "two", "models[0].replicas: 'two' is not an integer"),
    ("prod", ["models", 0, "replicas"], 0, "models[0].replicas: 0 is below the minimum 1"),
    ("prod", ["models", 0, "workload"], "daemonset",
     "models[0].workload: 'daemonset' is not allowed; use one of 'deployment', 'statefulset'"),
    ("prod", ["models", 0, "image"], "registry.example.com/llm-serving",
     "models[0].image: 'registry.example.com/llm-serving' is not pinned; use a version tag or digest"),
    ("prod", ["models", 0, "image"], "registry.example.com/llm-serving:latest",
     "models[0].image: 'registry.example.com/llm-serving:latest' is not pinned"),
    ("prod", ["models", 0, "image"], "registry.example.com:5000/llm-serving",
     "models[0].image: 'registry.example.com:5000/llm-serving' is not pinned"),
    ("prod", ["models", 0, "modelPath"], "/data/llama",
     "models[0].modelPath: '/data/llama' must be a directory under /models/"),
    ("prod", ["models", 0, "autoscaling", "maxReplicas"], 1,
     "models[0].autoscaling.maxReplicas: 1 is below minReplicas 2"),
    ("prod", ["models", 0, "replicas"], 12,
     "models[0].replicas: 12 is outside autoscaling minReplicas..maxReplicas (2..10)"),
    ("prod", ["models", 0, "autoscaling", "targetCpuUtilization"], 150,
     "models[0].autoscaling.targetCpuUtilization: 150 is above the maximum 100"),
    ("prod", ["models", 0, "resources", "requests", "cpu"], "16",
     "models[0].resources.requests.cpu: 16 is above the limit 8; requests must not exceed limits"),
    ("prod", ["models", 0, "resources"], {"requests": {"cpu": "500m"}, "limits": {"cpu": "1500m"}},
     "models[0].resources.limits.cpu: 1500m is below 2: the container runs its HTTP server and its engine in two "
     "processes (both runtimes), each busy on a core of its own while it streams, and under a smaller limit they "
     "throttle each other and streams stall; set at least 2"),
    ("prod", ["models", 0, "resources", "limits", "memory"], "16 GB",
     "models[0].resources.limits.memory: '16 GB' is not a Kubernetes quantity"),
    ("prod", ["models", 0, "env"], {"NVIDIA_VISIBLE_DEVICES": "all"},
     "models[0].env.NVIDIA_VISIBLE_DEVICES: must not be set: `all` exposes every GPU on the node"),
    ("prod", ["models", 0, "env"], {"MODEL_PATH": "/models/x"},
     "models[0].env.MODEL_PATH: is set by the platform from modelPath; set that instead"),
    ("prod", ["models", 0, "gpusPerReplica"], 16,
     "models[0].gpusPerReplica: 16: the builtin engine loads a model onto one GPU"),
    ("prod", ["models", 0, "storage", "accessMode"], "ReadWriteOnce",
     "models[0].storage.accessMode: ReadWriteOnce cannot be shared by up to 10 Deployment replicas"),
    ("prod", ["models", 0, "rollout"], {"maxSurge": 0, "maxUnavailable": 0},
     "models[0].rollout: maxSurge 0 and maxUnavailable 0 can never make progress"),
    ("prod", ["models", 0, "drainSeconds"], 41,
     "models[0].drainSeconds: 41 does not fit terminationGracePeriodSeconds 60: the pod needs 5 s preStop + 41 s "
     "drain + 15 s shutdown = 61 s, or the kubelet kills it mid-drain; lower drainSeconds to 40 or raise the grace "
     "period to 61"),
    ("prod", ["models", 0, "serviceType"], "ExternalName",
     "models[0].serviceType: 'ExternalName' is not allowed; use one of 'ClusterIP', 'LoadBalancer', 'NodePort'"),
    ("prod", ["models", 0, "probes", "startup", "failureThreshold"], 0,
     "models[0].probes.startup.failureThreshold: 0 is below the minimum 1"),
    ("prod", ["models", 0, "replica"], 2,
     "models[0].replica: unknown key; allowed keys here: name, servedModelName, modelPath, source, fill, image"),
    ("prod", ["gpuPool", "gpuMemory"], 80,
     "gpuPool.gpuMemory: unknown key; allowed keys here: gpuType, gpuMemoryGiB"),
    ("prod", ["ingres"], {"host": "x.example.com"}, "ingres: unknown key; allowed keys here: namespace, gpuPool"),
    ("prod", ["guardrails", "pdb"], {"maxUnavailable": 0},
     "guardrails.pdb.maxUnavailable: 0 allows no voluntary disruption, so every node drain and cluster upgrade "
     "blocks forever; use 1 or more"),
    ("prod", ["guardrails", "pdb"], {"maxUnavailable": None, "minAvailable": 2},
     "guardrails.pdb.minAvailable: 2 leaves no voluntary disruption for models[0] (llm-service) at its minimum "
     "of 2 replica(s), so node drains block forever; use maxUnavailable: 1 or minAvailable <= 1"),
    ("prod", ["guardrails", "pdb"], {"maxUnavailable": 1, "minAvailable": 1},
     "guardrails.pdb: set maxUnavailable or minAvailable, not both"),
    ("prod", ["guardrails", "resourceQuota", "gpus"], 8,
     "guardrails.resourceQuota.gpus: 8 GPUs cannot hold the models at maxReplicas (llm-service: 10 x 1 = 10 GPUs); "
     "raise the quota to 10 or lower maxReplicas"),
    ("prod", ["guardrails", "resourceQuota", "limitsMemory"], "100Gi",
     "guardrails.resourceQuota.limitsMemory: 100Gi is below what the models need at maxReplicas "
     "and the gateway at its maxReplicas (plus one surge pod) (limits.memory 167 GiB)"),
    ("prod", ["guardrails", "egressTo", "ports"], [70000],
     "guardrails.egressTo.ports[0]: 70000 is not a port (1-65535)"),
    ("prod", ["guardrails", "allowFrom", "ipBlocks"], ["10.0.0.0"],
     "guardrails.allowFrom.ipBlocks[0]: '10.0.0.0' is not a CIDR such as 10.0.0.0/8"),
    ("prod", ["guardrails", "apiKeyLength"], 8, "guardrails.apiKeyLength: 8 is below the minimum 32"),
    ("prod", ["ingress", "host"], "not a host", "ingress.host: 'not a host' is not a valid host name"),
    ("prod", ["ingress", "host"], None,
     "ingress.host: is required with gateway.enabled: the gateway is the stack's one endpoint, served at this host"),
    ("staging", ["ingress", "host"], None,
     "models[0].host: no Ingress host: set ingress.host (one model) or models[].host, or set ingress.enabled: false"),
    ("prod", ["gpuPool", "tolerations", 0, "value"], "present",
     "gpuPool.tolerations[0].value: 'present' must be unset with operator Exists"),
    ("prod", ["gpuPool", "tolerations", 0, "effect"], "NoRun",
     "gpuPool.tolerations[0].effect: 'NoRun' is not allowed; use one of 'NoSchedule', 'PreferNoSchedule'"),
    ("prod", ["observability", "prometheusOperator"], "yes",
     "observability.prometheusOperator: 'yes' is not true or false"),
    ("dev", ["models", 0, "name"], "LLM_Service",
     "models[0].name: 'LLM_Service' is not a valid Kubernetes name"),
    ("prod", ["models", 0, "servedModelName"], "", "models[0].servedModelName: '' is not a non-empty string"),
]


@pytest.mark.parametrize("stack, path, value, message", BAD, ids=[".".join(map(str, b[1])) + "=" + repr(b[2])[:20]
                                                                  for b in BAD])
def test_bad_config_is_one_clear_error(stack, path, value, message):
    values = set_path(stack_values(stack), path, value)
    with pytest.raises(ConfigError) as err:
        parse_stack_config(stack, values)
    assert str(err.value).startswith(f"stack '{stack}': llm-platform:{message}"), str(err.value)


def test_missing_required_model_field():
    values = stack_values("prod")
    del model0(values)["image"]
    with pytest.raises(ConfigError, match=r"^stack 'prod': llm-platform:models\[0\]\.image: is required for runtime "
                                          r"builtin: the serving image built from serving/"):
        parse_stack_config("prod", values)


def test_duplicate_model_names_and_hosts():
    values = stack_values("prod")
    values["gateway"] = {"enabled": False}  # without the gateway, each model needs its own Ingress host
    values["models"].append(dict(model0(values), host="other.example.com"))
    with pytest.raises(ConfigError, match=r"models\[1\]\.name: 'llm-service' is already used by models\[0\]"):
        parse_stack_config("prod", values)
    values["models"][1]["name"] = "llm-other"
    values["models"][1]["host"] = "llm-api.example.com"
    with pytest.raises(ConfigError, match=r"models\[1\]\.host: 'llm-api\.example\.com' is already the host of models\[0\]"):
        parse_stack_config("prod", values)


def test_statefulset_needs_read_write_once():
    values = stack_values("prod")
    model0(values)["workload"] = "statefulset"
    with pytest.raises(ConfigError, match=r"models\[0\]\.storage\.accessMode: 'ReadWriteMany': a StatefulSet gets one "
                                          r"volume per replica"):
        parse_stack_config("prod", values)


# --------------------------------------------------------------------------------- good configs at the edge


def test_every_stack_file_is_valid():
    for stack in ("dev", "staging", "prod", "examples/Pulumi.prod-statefulset.yaml"):
        parse_stack_config(stack, stack_values(stack))


def test_boundaries_that_pass():
    values = stack_values("prod")
    m = model0(values)
    m["autoscaling"]["maxReplicas"] = 2          # max == min
    m["replicas"] = 2
    m["drainSeconds"] = 40                       # 5 + 40 + 15 = the 60 s grace period exactly
    m["resources"]["requests"]["cpu"] = "8"      # request == limit
    values["guardrails"]["resourceQuota"]["gpus"] = 2   # quota == GPUs at max
    values["guardrails"]["pdb"] = {"maxUnavailable": None, "minAvailable": 1}  # one disruption left at min 2
    cfg = parse_stack_config("prod", values).config
    assert cfg.models[0].autoscaling.max_replicas == 2
    assert cfg.guardrails.pdb.min_available == 1
    assert cfg.total_gpus_at_max == 2


def test_defaults_are_the_article_values_and_yaml_overrides_them():
    values = stack_values("staging")
    planned = parse_stack_config("staging", values)
    m = planned.models[0]
    assert m.probes.liveness.initial_delay_seconds == 30 and m.probes.startup.failure_threshold == 30
    assert m.config.autoscaling.scale_down_stabilization_seconds == 300
    assert (m.config.autoscaling.min_replicas, m.config.autoscaling.max_replicas) == (1, 3)
    assert planned.config.stack == "staging"
