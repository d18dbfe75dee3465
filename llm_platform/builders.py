"""Pure builders: plain functions from typed config to Kubernetes-shaped dicts (camelCase, as in YAML).

Components wire these into resources; tests call them directly without mocks. Nothing here touches Pulumi.
"""
from __future__ import annotations

from typing import Any

from llm_platform.config import (
    GPU_RESOURCE,
    MODELS_MOUNT,
    PRESTOP_SLEEP_SECONDS,
    AllowFromConfig,
    AutoscalingConfig,
    GpuPoolConfig,
    ProbeConfig,
    ResourceAmounts,
    lora_adapter_paths,
)
from llm_platform.metric_contract import LOAD_METRIC, RUNTIMES
from llm_platform.model_source import parse_source
from llm_platform.plan import PlannedModel

SERVING_PORT = 8000
PORT_NAME = "http"
CONTAINER_NAME = "llm-api"
SERVING_COMPONENT = "llm-serving"
PART_OF = "llm-platform"
RUN_AS_ID = 10001
API_KEYS_DIR = "/var/run/secrets/llm-platform"
API_KEYS_FILE_KEY = "api-keys"
FILL_LABEL = "llm-platform/fills-model"
"""On every pod that downloads a model (the fill Jobs' pods only): the fill egress policy selects it."""
SOURCE_ANNOTATION = "llm-platform/model-source"
REVISION_ANNOTATION = "llm-platform/model-revision"
ROLE_LABEL = "llm-platform/role"
"""On LeaderWorkerSet pods: `leader` (serves the API, probed, behind the Service) or `worker` (joins the leader)."""
VLLM_MASTER_PORT = 29501
"""torch.distributed rendezvous on the leader of a multi-node vLLM group (`--master-port`)."""
EPHEMERAL_PORTS = (32768, 60999)
"""Linux's default `net.ipv4.ip_local_port_range`: NCCL's bootstrap and socket transport and vLLM's cross-node
message queues listen on kernel-chosen ports in it, so a group's pods must reach each other there."""
SOURCE_CREDENTIALS_DIR = "/var/run/secrets/model-source"
"""fill.secretName is mounted here as files (HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never as env."""


# ---------------------------------------------------------------------------------------- labels


def selector_labels(model_name: str) -> dict[str, str]:
    """The immutable selector of one model's pods (the article's `app: <name>`)."""
    return {"app": model_name}


def labels(model_name: str) -> dict[str, str]:
    return {
        **selector_labels(model_name),
        "app.kubernetes.io/name": model_name,
        "app.kubernetes.io/component": SERVING_COMPONENT,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def source_annotations(model: PlannedModel) -> dict[str, str]:
    """On the pod template: a new revision changes the template, so the workload rolls onto it."""
    if model.config.source is None:
        return {}
    source = model.config.source
    return {SOURCE_ANNOTATION: source, REVISION_ANNOTATION: parse_source(source).revision_label}


def service_selector(model: PlannedModel) -> dict[str, str]:
    """What the model's Service selects: every pod, or only the leaders of a LeaderWorkerSet's groups (the
    workers serve no HTTP)."""
    if model.config.workload == "leaderworkerset":
        return {**selector_labels(model.name), ROLE_LABEL: "leader"}
    return selector_labels(model.name)


def serving_pods_selector() -> dict[str, str]:
    """Selects every serving pod of every model (NetworkPolicies)."""
    return {"app.kubernetes.io/component": SERVING_COMPONENT, "app.kubernetes.io/part-of": PART_OF}


# ------------------------------------------------------------------------------- security context


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "fsGroup": RUN_AS_ID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The Pod Security Standards `restricted` profile, plus a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# ------------------------------------------------------------------------------------------ probes


def probe(path: str, cfg: ProbeConfig) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME, "scheme": "HTTP"},
        "initialDelaySeconds": cfg.initial_delay_seconds,
        "periodSeconds": cfg.period_seconds,
        "timeoutSeconds": cfg.timeout_seconds,
        "failureThreshold": cfg.failure_threshold,
        "successThreshold": 1,
    }


def probes(model: PlannedModel) -> dict[str, dict[str, Any]]:
    """Startup (model loaded and warmed), liveness (engine loop alive), readiness (not draining), on the
    paths of the model's runtime."""
    health = RUNTIMES[model.config.runtime].health
    return {
        "startupProbe": probe(health["startup"], model.probes.startup),
        "livenessProbe": probe(health["liveness"], model.probes.liveness),
        "readinessProbe": probe(health["readiness"], model.probes.readiness),
    }


# --------------------------------------------------------------------------------------- resources


def container_resources(model: PlannedModel, gpu_resource: str = GPU_RESOURCE) -> dict[str, Any]:
    """Requests and limits; GPUs are extended resources, so requests must equal limits."""
    def amounts(amount: ResourceAmounts) -> dict[str, str]:
        out = {"cpu": amount.cpu, "memory": amount.memory, "ephemeral-storage": amount.ephemeral_storage}
        if model.config.gpus_per_replica:
            out[gpu_resource] = str(model.config.gpus_per_pod)
        return out

    return {"requests": amounts(model.config.resources.requests), "limits": amounts(model.config.resources.limits)}


# --------------------------------------------------------------------------------------- pod spec


def model_volume_name(model: PlannedModel) -> str:
    return "model-storage" if model.config.workload != "statefulset" else model.storage.template_name


def serving_env(model: PlannedModel) -> list[dict[str, Any]]:
    env = [
        {"name": "MODEL_NAME", "value": model.config.served_model_name},
        {"name": "MODEL_PATH", "value": model.model_path},
        {"name": "PORT", "value": str(SERVING_PORT)},
        {"name": "API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE_KEY}"},
        {"name": "DRAIN_SECONDS", "value": str(model.config.drain_seconds)},
        {"name": "GPU_MEMORY_UTILIZATION", "value": str(model.config.gpu_memory_utilization)},
        # The root filesystem is read-only: every cache goes to the /tmp emptyDir; weights are never fetched.
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
    ]
    if model.max_num_seqs is not None:
        env.append({"name": "MAX_NUM_SEQS", "value": str(model.max_num_seqs)})
    if model.max_model_len is not None:
        env.append({"name": "MAX_MODEL_LEN", "value": str(model.max_model_len)})
    env.append({"name": "BLOCK_SIZE", "value": str(model.config.kv_block_size)})
    env.append({"name": "ENABLE_PREFIX_CACHING", "value": "on" if model.config.prefix_caching else "off"})
    env.extend({"name": k, "value": v} for k, v in sorted(model.config.env.items()))
    return env


def vllm_args(model: PlannedModel, role: str = "server") -> list[str]:
    """`vllm serve` flags, from the same config the capacity plan checked. `role`: `server` (one pod per replica,
    or a LeaderWorkerSet group's leader) or `worker` (a group's other nodes, headless)."""
    args = [model.model_path, "--served-model-name", model.config.served_model_name,
            "--host", "0.0.0.0", "--port", str(SERVING_PORT),
            "--tensor-parallel-size", str(max(1, model.config.gpus_per_pod)),
            "--gpu-memory-utilization", str(model.config.gpu_memory_utilization)]
    if model.config.nodes_per_replica > 1:
        # vLLM's own multi-node launcher (mp backend): tensor parallel inside a node, pipeline parallel across the
        # group's nodes; LWS injects the leader's address and this pod's index in the group.
        args += ["--pipeline-parallel-size", str(model.config.nodes_per_replica),
                 "--distributed-executor-backend", "mp", "--nnodes", str(model.config.nodes_per_replica),
                 "--node-rank", "$(LWS_WORKER_INDEX)", "--master-addr", "$(LWS_LEADER_ADDRESS)",
                 "--master-port", str(VLLM_MASTER_PORT)]
        if role == "worker":
            args.append("--headless")
    if model.config.sizing is not None and model.config.sizing.dtype in ("bfloat16", "float16"):
        args += ["--dtype", model.config.sizing.dtype]
    if model.max_model_len is not None:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.max_num_seqs is not None:
        args += ["--max-num-seqs", str(model.max_num_seqs)]
    v = model.config.vllm
    if v.quantization is not None:
        args += ["--quantization", v.quantization]
    if v.kv_cache_dtype is not None:
        args += ["--kv-cache-dtype", v.kv_cache_dtype]
    if v.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if v.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(v.max_num_batched_tokens)]
    if v.lora_adapters:
        args += ["--enable-lora", "--lora-modules",
                 *(f"{name}={path}" for name, path in lora_adapter_paths(model.config, model.model_path).items())]
        if v.max_lora_rank is not None:
            args += ["--max-lora-rank", str(v.max_lora_rank)]
    if v.tool_call_parser is not None:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", v.tool_call_parser]
    if v.reasoning_parser is not None:
        args += ["--reasoning-parser", v.reasoning_parser]
    return args + list(v.extra_args)


VLLM_SERVER_SCRIPT = 'VLLM_API_KEY="$(cat "$API_KEYS_FILE")" && export VLLM_API_KEY && exec vllm serve "$@"'
"""vLLM takes its key from VLLM_API_KEY or --api-key only: read it from the mounted Secret file at start, so it is
never a literal in the manifest, never in an env reference the API shows, and never on the command line."""


def vllm_env(model: PlannedModel) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # Read-only root filesystem: every cache (HF, torch compile, Triton) under the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]
    if model.config.nodes_per_replica > 1:
        # The address this node announces to the group (NCCL, the cross-node message queues): the pod's own IP.
        env.append({"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env.extend({"name": k, "value": v} for k, v in sorted(model.config.env.items()))
    return env


def serving_container(model: PlannedModel, gpu_resource: str = GPU_RESOURCE,
                      api_key_secret: str = "llm-api-keys", role: str = "server") -> dict[str, Any]:
    """The serving container. `role`: `server` (serves the API, probed) or `worker` (a LeaderWorkerSet group's
    non-leader node: no API, no key, no probes; a dead worker restarts its whole group)."""
    mounts = [{"name": model_volume_name(model), "mountPath": MODELS_MOUNT, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    if role == "server":
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    if model.config.runtime == "builtin":
        runtime_fields: dict[str, Any] = {"env": serving_env(model)}
    elif role == "server":
        runtime_fields = {"command": ["/bin/sh", "-c", VLLM_SERVER_SCRIPT, "vllm"], "args": vllm_args(model),
                          "env": [{"name": "API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE_KEY}"},
                                  *vllm_env(model)]}
    else:
        runtime_fields = {"command": ["vllm", "serve"], "args": vllm_args(model, "worker"), "env": vllm_env(model)}
    if model.shm_size:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return {
        "name": CONTAINER_NAME,
        "image": model.image,
        "imagePullPolicy": model.config.image_pull_policy,
        "ports": [{"name": PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        **runtime_fields,
        "resources": container_resources(model, gpu_resource),
        "volumeMounts": mounts,
        **(probes(model) if role == "server" else {}),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def fetch_image(model: PlannedModel) -> str | None:
    """The image that runs `python -m serving.fetch`: fill.image, else the builtin runtime's serving image."""
    return model.config.fill.image or (model.image if model.config.runtime == "builtin" else None)


def fetch_container(model: PlannedModel, *, fill: bool, adapter: str | None = None) -> dict[str, Any]:
    """`python -m serving.fetch` from the serving image: fill the model's revision directory (resumable,
    verified, atomic; nothing to do when its manifest matches) or, with `fill=False`, only check that the
    directory holds the complete model before the server starts (read-only, offline). With `adapter`, the same for
    that LoRA adapter's source and directory."""
    source = model.config.vllm.lora_adapters[adapter] if adapter else model.config.source
    if source is None:
        raise ValueError(f"{model.name}: fetch_container needs a model with a source")
    destination = lora_adapter_paths(model.config, model.model_path)[adapter] if adapter else model.model_path
    src = parse_source(source)
    fill_config = model.config.fill
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf-home"},
                                 {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    command = ["python", "-m", "serving.fetch"]
    env.append({"name": "FILL_VERIFY_MODE", "value": fill_config.verify})
    if fill:
        # Planning resolves the stack default (on for prod*), so it is never None here.
        env.append({"name": "FILL_REQUIRE_CHECKSUMS", "value": "true" if model.require_checksums else "false"})
        command += ["--keep-revisions", str(fill_config.keep_revisions)]
        # The image is offline by default (serving never downloads); the fill is the one process that may.
        env.append({"name": "HF_HUB_OFFLINE", "value": "0"})
        if src.kind == "hf" and fill_config.hf_endpoint:
            env.append({"name": "HF_ENDPOINT", "value": fill_config.hf_endpoint})
        if src.kind == "s3":
            env.append({"name": "AWS_REGION", "value": fill_config.s3_region})
            if fill_config.s3_endpoint:
                env.append({"name": "AWS_ENDPOINT_URL_S3", "value": fill_config.s3_endpoint})
        if fill_config.secret_name and src.kind != "pvc":
            env.append({"name": "MODEL_SOURCE_CREDENTIALS_DIR", "value": SOURCE_CREDENTIALS_DIR})
        amounts = fill_config.resources
        resources = {
            "requests": {"cpu": amounts.requests.cpu, "memory": amounts.requests.memory,
                         "ephemeral-storage": amounts.requests.ephemeral_storage},
            "limits": {"cpu": amounts.limits.cpu, "memory": amounts.limits.memory,
                       "ephemeral-storage": amounts.limits.ephemeral_storage},
        }
    else:
        command.append("--verify")
        resources = {"requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "64Mi"},
                     "limits": {"cpu": "1", "memory": "512Mi", "ephemeral-storage": "256Mi"}}
    return {
        "name": (("model-fill" if fill else "model-check")
                 + (f"-{adapter}".replace(".", "-").replace("_", "-")[:40].rstrip("-") if adapter else "")),
        "image": fetch_image(model),
        "imagePullPolicy": model.config.image_pull_policy,
        "command": command + [source, destination],
        "env": env,
        "resources": resources,
        "volumeMounts": [{"name": model_volume_name(model), "mountPath": MODELS_MOUNT, "readOnly": not fill},
                         {"name": "tmp", "mountPath": "/tmp"}]
        + ([{"name": "source-credentials", "mountPath": SOURCE_CREDENTIALS_DIR, "readOnly": True}]
           if fill and source_credentials_volume(model) else []),
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def source_credentials_volume(model: PlannedModel) -> dict[str, Any] | None:
    """The fill's credentials Secret as a volume (its keys become files under SOURCE_CREDENTIALS_DIR)."""
    source = model.config.source
    if source is None or not model.config.fill.secret_name or parse_source(source).kind == "pvc":
        return None
    # Optional: a public model needs none, and a missing Secret then fails the fill with a message naming it,
    # instead of leaving the pod stuck in ContainerCreating.
    return {"name": "source-credentials",
            "secret": {"secretName": model.config.fill.secret_name, "defaultMode": 0o440, "optional": True}}


def gpu_scheduling(pool: GpuPoolConfig, priority_class_name: str | None) -> dict[str, Any]:
    """Pod-spec fields that put a GPU pod on the GPU nodes (never NVIDIA_VISIBLE_DEVICES)."""
    spec: dict[str, Any] = {}
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [
            {k: v for k, v in {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect}.items()
             if v is not None}
            for t in pool.tolerations
        ]
    if pool.runtime_class_name:
        spec["runtimeClassName"] = pool.runtime_class_name
    if priority_class_name:
        spec["priorityClassName"] = priority_class_name
    return spec


def pod_spec(model: PlannedModel, *, service_account: str, api_key_secret: str,
             scheduling: dict[str, Any], gpu_resource: str = GPU_RESOURCE, role: str = "server") -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": model.config.resources.limits.ephemeral_storage}},
    ]
    if role == "server":
        volumes.append({"name": "api-keys", "secret": {
            "secretName": api_key_secret, "defaultMode": 0o440,
            "items": [{"key": API_KEYS_FILE_KEY, "path": API_KEYS_FILE_KEY}]}})
    if model.shm_size:
        # Tensor-parallel workers exchange through /dev/shm; the container runtime's 64 MB default crashes them.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": model.shm_size}})
    if model.config.workload != "statefulset":
        volumes.insert(0, {"name": "model-storage",
                           "persistentVolumeClaim": {"claimName": model.storage.claim_name, "readOnly": True}})
    spec: dict[str, Any] = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": model.config.termination_grace_period_seconds,
        "containers": [serving_container(model, gpu_resource, api_key_secret, role)],
        "volumes": volumes,
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(model.name)},
        }],
    }
    if model.config.source is not None:
        # The server starts only on a complete model (and LoRA adapters) of the configured revision; serving pods
        # never download (ModelStorage's fill Jobs do), so they never need the source's network or credentials.
        spec["initContainers"] = [fetch_container(model, fill=False)] + [
            fetch_container(model, fill=False, adapter=name) for name in sorted(model.config.vllm.lora_adapters)]
    if model.config.gpus_per_replica:
        spec.update(scheduling)
    return spec


# -------------------------------------------------------------------------------------- autoscaling


def hpa_behavior(autoscaling: AutoscalingConfig) -> dict[str, Any]:
    """Scale up fast (double or +2 pods per 30 s), scale down slowly (half per minute after 5 min calm)."""
    return {
        "scaleDown": {
            "stabilizationWindowSeconds": autoscaling.scale_down_stabilization_seconds,
            "policies": [{"type": "Percent", "value": autoscaling.scale_down_percent,
                          "periodSeconds": autoscaling.scale_down_period_seconds}],
        },
        "scaleUp": {
            "stabilizationWindowSeconds": autoscaling.scale_up_stabilization_seconds,
            "policies": [
                {"type": "Percent", "value": autoscaling.scale_up_percent,
                 "periodSeconds": autoscaling.scale_up_period_seconds},
                {"type": "Pods", "value": autoscaling.scale_up_pods,
                 "periodSeconds": autoscaling.scale_up_period_seconds},
            ],
            "selectPolicy": "Max",
        },
    }


def leader_worker_set_spec(model: PlannedModel, leader: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    """One group of `nodes_per_replica` pods per replica. The group starts and restarts as a whole: workers are
    created with the leader (the leader's vLLM waits for them, so `LeaderReady` would never become ready) and a
    lost pod, a restarted container or a drained node recreates the group, since a pipeline missing a stage cannot
    serve. Updates roll group by group."""
    return {
        "replicas": model.config.replicas,
        "startupPolicy": "LeaderCreated",
        "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {
            "maxSurge": model.rollout.max_surge, "maxUnavailable": model.rollout.max_unavailable}},
        "leaderWorkerTemplate": {
            "size": model.config.nodes_per_replica,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader,
            "workerTemplate": worker,
        },
    }


def scale_target(model: PlannedModel, kind: str, name: str | None = None) -> dict[str, str]:
    api_version = "leaderworkerset.x-k8s.io/v1" if kind == "LeaderWorkerSet" else "apps/v1"
    return {"apiVersion": api_version, "kind": kind, "name": name or model.name}


def hpa_spec(model: PlannedModel, kind: str, target_load: int, name: str | None = None) -> dict[str, Any]:
    """Scale on requests per replica (a GPU pod saturates long before its CPU); the article's CPU and memory
    targets stay as secondary metrics (the HPA takes the largest proposal)."""
    autoscaling = model.config.autoscaling

    def utilization(resource: str, target: int) -> dict[str, Any]:
        return {"type": "Resource", "resource": {"name": resource,
                                                 "target": {"type": "Utilization", "averageUtilization": target}}}

    load = {"type": "Pods", "pods": {"metric": {"name": LOAD_METRIC},
                                     "target": {"type": "AverageValue", "averageValue": str(target_load)}}}
    return {
        "scaleTargetRef": scale_target(model, kind, name),
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "metrics": [load, utilization("cpu", autoscaling.target_cpu_utilization),
                    utilization("memory", autoscaling.target_memory_utilization)],
        "behavior": hpa_behavior(autoscaling),
    }


def keda_scaled_object_spec(model: PlannedModel, kind: str, *, query: str, prometheus_url: str,
                            target_load: int, name: str | None = None) -> dict[str, Any]:
    """KEDA on the same signal as the HPA; it can scale to zero (minReplicaCount 0) and wake on load."""
    autoscaling = model.config.autoscaling
    return {
        "scaleTargetRef": scale_target(model, kind, name),
        "minReplicaCount": autoscaling.min_replicas,
        "maxReplicaCount": autoscaling.max_replicas,
        "pollingInterval": 15,
        "cooldownPeriod": autoscaling.cooldown_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": hpa_behavior(autoscaling)}},
        "triggers": [{
            "type": "prometheus",
            "metadata": {"serverAddress": prometheus_url, "query": query, "threshold": str(target_load),
                         "activationThreshold": str(autoscaling.activation_load)},
        }],
    }


# ------------------------------------------------------------------------------------ network policy


def namespace_selector(name: str) -> dict[str, Any]:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def caller_peers(allow_from: AllowFromConfig, namespaces: list[str]) -> list[dict[str, Any]]:
    """NetworkPolicy peers for the stack's callers: `allowFrom` (namespaces, narrowed to pod labels, and CIDRs)
    and whole namespaces such as the ingress controller's and Prometheus's."""
    peers: list[dict[str, Any]] = []
    for ns in allow_from.namespaces:
        peer: dict[str, Any] = {"namespaceSelector": namespace_selector(ns)}
        if allow_from.pod_labels:
            peer["podSelector"] = {"matchLabels": dict(allow_from.pod_labels)}
        peers.append(peer)
    peers.extend({"namespaceSelector": namespace_selector(ns)} for ns in namespaces)
    peers.extend({"ipBlock": {"cidr": cidr}} for cidr in allow_from.ip_blocks)
    return peers


def dns_egress_rule() -> dict[str, Any]:
    """DNS to kube-dns, which the article's policy forgot (every name lookup then times out)."""
    return {
        "to": [{"namespaceSelector": namespace_selector("kube-system"),
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def group_network_policy_spec(model_name: str) -> dict[str, Any]:
    """The pods of one model's LeaderWorkerSet groups reach each other, and only each other, on the ports a
    multi-node vLLM uses: the leader's rendezvous port and the ephemeral range (NCCL, vLLM's message queues)."""
    group = {"matchLabels": selector_labels(model_name),
             "matchExpressions": [{"key": ROLE_LABEL, "operator": "In", "values": ["leader", "worker"]}]}
    ports = [{"protocol": "TCP", "port": VLLM_MASTER_PORT},
             {"protocol": "TCP", "port": EPHEMERAL_PORTS[0], "endPort": EPHEMERAL_PORTS[1]}]
    return {
        "podSelector": group,
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": group}], "ports": ports}],
        "egress": [{"to": [{"podSelector": group}], "ports": ports}],
    }
