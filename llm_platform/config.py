"""Typed, validated stack configuration: the schema, its reader and the cross-field rules.

`Pulumi.<stack>.yaml` keys (`llm-platform:<key>`, camelCase, structured objects) are read into frozen
dataclasses. Defaults live on the dataclasses, once. Every problem raises `ConfigError` with one message
naming the stack, the key path, the bad value and what is allowed; unknown keys are errors at every level.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import pulumi

from llm_platform.model_source import SourceError, parse_source
from llm_platform.quantities import QuantityError, parse_quantity

PROJECT = "llm-platform"
GPU_RESOURCE = "nvidia.com/gpu"
MODELS_MOUNT = "/models"
PRESTOP_SLEEP_SECONDS = 5
"""Endpoints controllers need a moment to drop a terminating pod; until then it still gets traffic."""
SHUTDOWN_AFTER_DRAIN_SECONDS = 15
"""After its drain the image may take this long more: aborted streams finish (5 s) and uvicorn stops (5 s),
plus margin. The pod's grace period must cover preStop + drain + this."""
MIN_SERVING_CPU = 2
"""CPUs a serving container needs at least: its HTTP process and its engine process each keep a core busy while
they stream (the serving image's ENGINE_PROCESS; vLLM's API server and engine core)."""

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOSTNAME = re.compile(r"^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,63}$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CIDR = re.compile(r"[0-9a-fA-F:.]+/\d{1,3}")


class ConfigError(pulumi.RunError):
    """Bad stack configuration. Subclasses RunError so `pulumi preview` prints the message, not a traceback."""

    def __init__(self, stack: str, path: str, problem: str):
        self.stack, self.path, self.problem = stack, path, problem
        super().__init__(f"stack '{stack}': {PROJECT}:{path}: {problem}")


def _quantity(**extra: Any) -> dict[str, Any]:
    return {"quantity": True, **extra}


# --------------------------------------------------------------------------------------------------
# The configuration schema. Field names are snake_case; the YAML key is the camelCase form.
# Field metadata: quantity (a Kubernetes quantity string), min/max (numbers), dns (a DNS-1123 label).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Toleration:
    key: str
    """Taint key to tolerate, e.g. `nvidia.com/gpu`."""
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    """Taint value; only with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


@dataclass(frozen=True)
class PriorityClassConfig:
    name: str = field(default="llm-inference", metadata={"dns": True})
    """PriorityClass created for serving pods, so they are not preempted by batch work."""
    value: int = field(default=100000, metadata={"min": 0, "max": 1000000000})
    preemption_policy: Literal["PreemptLowerPriority", "Never"] = "PreemptLowerPriority"


@dataclass(frozen=True)
class NodeShape:
    cpu: str = field(metadata=_quantity())
    """Allocatable CPU of one GPU node."""
    memory: str = field(metadata=_quantity())
    """Allocatable memory of one GPU node."""


@dataclass(frozen=True)
class GpuPoolConfig:
    gpu_type: str = "nvidia-h100-80gb"
    """Human name of the GPU model the pool holds (shown in the plan and on pod labels)."""
    gpu_memory_gib: int = field(default=80, metadata={"min": 1, "key": "gpuMemoryGiB"})
    """Memory of one GPU, used by capacity checks."""
    gpus_per_node: int | None = field(default=None, metadata={"min": 1})
    """GPUs on one node of the pool; a replica asking for more runs as a LeaderWorkerSet group across nodes (vLLM),
    and the capacity plan suggests multi-node layouts from it."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Node labels that pick the GPU nodes (e.g. `nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`)."""
    tolerations: list[Toleration] = field(
        default_factory=lambda: [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    )
    """Tolerations for the GPU nodes' taints."""
    runtime_class_name: str | None = field(default=None, metadata={"dns": True})
    """An existing RuntimeClass (e.g. `nvidia` from the GPU operator); unset uses the node default."""
    priority_class: PriorityClassConfig | None = None
    """When set, a PriorityClass is created and used by every serving pod."""
    node_shape: NodeShape | None = None
    """Allocatable cpu and memory of one GPU node; when set, a replica requesting more is an error."""
    hourly_cost_per_gpu: float | None = field(default=None, metadata={"min": 0})
    """Price of one GPU hour; when set, the capacity plan shows cost per hour at min and max replicas."""


@dataclass(frozen=True)
class ResourceQuotaConfig:
    enabled: bool = True
    """Create the ResourceQuota."""
    name: str = field(default="llm-quota", metadata={"dns": True})
    requests_cpu: str = field(default="100", metadata=_quantity())
    requests_memory: str = field(default="200Gi", metadata=_quantity())
    limits_cpu: str = field(default="200", metadata=_quantity())
    limits_memory: str = field(default="400Gi", metadata=_quantity())
    gpus: int = field(default=10, metadata={"min": 0})
    """Cap on `requests.nvidia.com/gpu` and `limits.nvidia.com/gpu`."""
    persistent_volume_claims: int = field(default=10, metadata={"min": 0})
    storage_by_class: dict[str, str] = field(default_factory=lambda: {"fast-ssd": "5Ti"})
    """Storage request cap per StorageClass."""


@dataclass(frozen=True)
class LimitRangeConfig:
    enabled: bool = True
    """Create the LimitRange (defaults for containers that set no requests or limits)."""
    name: str = field(default="llm-limits", metadata={"dns": True})
    default_cpu: str = field(default="4", metadata=_quantity())
    default_memory: str = field(default="8Gi", metadata=_quantity())
    default_request_cpu: str = field(default="2", metadata=_quantity())
    default_request_memory: str = field(default="4Gi", metadata=_quantity())
    default_ephemeral_storage: str = field(default="4Gi", metadata=_quantity())
    default_request_ephemeral_storage: str = field(default="1Gi", metadata=_quantity())
    max_cpu: str | None = field(default=None, metadata=_quantity())
    """Largest cpu limit a container may set; serving containers above it are refused at preview."""
    max_memory: str | None = field(default=None, metadata=_quantity())
    """Largest memory limit a container may set."""


@dataclass(frozen=True)
class PdbConfig:
    max_unavailable: int | None = field(default=1, metadata={"min": 0})
    """Pods that may be down at once during voluntary disruptions (node drains). Must allow at least one."""
    min_available: int | None = field(default=None, metadata={"min": 0})
    """Alternative to maxUnavailable; must stay below the minimum replica count."""


@dataclass(frozen=True)
class AllowFromConfig:
    namespaces: list[str] = field(default_factory=lambda: ["api-gateway"])
    """Namespaces whose pods may call the serving port."""
    pod_labels: dict[str, str] = field(default_factory=lambda: {"app": "api-gateway"})
    """When non-empty, only pods with these labels in those namespaces may call."""
    ip_blocks: list[str] = field(default_factory=list)
    """CIDRs allowed to call (e.g. a LoadBalancer's source ranges)."""


@dataclass(frozen=True)
class EgressToConfig:
    namespaces: list[str] = field(default_factory=lambda: ["model-storage"])
    """Namespaces serving pods may reach (besides DNS)."""
    ports: list[int] = field(default_factory=lambda: [443])


@dataclass(frozen=True)
class GuardrailsConfig:
    pod_security: Literal["restricted", "baseline"] = "restricted"
    """Pod Security Admission level enforced on the namespace."""
    pod_security_version: str = "v1.33"
    """The Pod Security Standards version the level is enforced at (the cluster's minor version, or older); pinned,
    so a cluster upgrade cannot tighten the rules under running pods. `latest` is refused."""
    resource_quota: ResourceQuotaConfig = field(default_factory=ResourceQuotaConfig)
    limit_range: LimitRangeConfig = field(default_factory=LimitRangeConfig)
    pdb: PdbConfig = field(default_factory=PdbConfig)
    network_policies: bool = True
    """Default-deny NetworkPolicies with explicit allows."""
    allow_from: AllowFromConfig = field(default_factory=AllowFromConfig)
    egress_to: EgressToConfig = field(default_factory=EgressToConfig)
    api_key_length: int = field(default=48, metadata={"min": 32, "max": 256})
    """Length of the generated API key (pulumi_random)."""


@dataclass(frozen=True)
class IngressConfig:
    enabled: bool = True
    """Create an Ingress per model (off for clusters without an ingress controller)."""
    class_name: str = "nginx"
    """`spec.ingressClassName` (the `kubernetes.io/ingress.class` annotation is deprecated)."""
    host: str | None = None
    """Public host name of the (single) model; models may set their own `host`."""
    tls: bool = True
    """Terminate TLS at the Ingress with a certificate from cert-manager."""
    cluster_issuer: str = "letsencrypt-prod"
    """cert-manager ClusterIssuer that issues the TLS certificate."""
    tls_secret_name: str = field(default="llm-tls", metadata={"dns": True})
    controller_namespace: str = field(default="ingress-nginx", metadata={"dns": True})
    """Namespace of the ingress controller pods; the NetworkPolicy lets them reach the serving port."""
    annotations: dict[str, str] = field(default_factory=dict)
    """Extra Ingress annotations (e.g. proxy timeouts for long streams)."""


@dataclass(frozen=True)
class ObservabilityConfig:
    prometheus_operator: bool = False
    """The cluster runs the Prometheus operator: create ServiceMonitor and PrometheusRule."""
    prometheus_namespace: str = field(default="monitoring", metadata={"dns": True})
    """Namespace of Prometheus; the NetworkPolicy lets it scrape the serving port."""
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Prometheus query URL for KEDA's trigger and prometheus-adapter."""
    queue_depth_threshold: int = field(default=10, metadata={"min": 1})
    """Alert when more requests than this wait for a slot..."""
    queue_depth_minutes: int = field(default=5, metadata={"min": 1})
    """...for this many minutes."""
    gpu_idle_utilization_percent: int = field(default=10, metadata={"min": 1, "max": 100})
    """Alert when GPU utilization stays below this while the model runs above its minimum replicas."""
    certificate_expiry_days: int = field(default=14, metadata={"min": 1})
    """Alert when the serving TLS certificate expires within this many days."""
    scrape_interval: str = "15s"
    grafana_dashboard: bool = True
    """A Grafana dashboard ConfigMap labelled for the Grafana sidecar."""
    ttft_slo_seconds: float = field(default=2.0, metadata={"min": 0.01})
    """Time-to-first-token p95 objective used by the alert."""
    error_ratio_slo: float = field(default=0.05, metadata={"min": 0.0001, "max": 1})


@dataclass(frozen=True)
class ResourceAmounts:
    cpu: str = field(metadata=_quantity())
    memory: str = field(metadata=_quantity())
    ephemeral_storage: str = field(default="2Gi", metadata=_quantity())


@dataclass(frozen=True)
class ResourcesConfig:
    requests: ResourceAmounts = field(
        default_factory=lambda: ResourceAmounts(cpu="4", memory="8Gi", ephemeral_storage="2Gi"))
    limits: ResourceAmounts = field(
        default_factory=lambda: ResourceAmounts(cpu="8", memory="16Gi", ephemeral_storage="8Gi"))


@dataclass(frozen=True)
class AutoscalingConfig:
    enabled: bool = True
    """Scale the workload (the workload then ignores `replicas` changes on update)."""
    mode: Literal["hpa", "keda"] = "hpa"
    """`hpa`: autoscaling/v2 HPA on load per replica via prometheus-adapter, CPU and memory as secondary
    metrics. `keda`: a KEDA ScaledObject on the same signal, which can scale to zero (minReplicas 0)."""
    min_replicas: int = field(default=2, metadata={"min": 0})
    max_replicas: int = field(default=10, metadata={"min": 1})
    target_cpu_utilization: int = field(default=70, metadata={"min": 1, "max": 100})
    target_memory_utilization: int = field(default=80, metadata={"min": 1, "max": 100})
    target_load_per_replica: int | None = field(default=None, metadata={"min": 1})
    """Running plus waiting requests per replica at which to scale out; unset: the replica's slot count
    (maxNumSeqs), so replicas are added as soon as requests start to queue."""
    activation_load: int = field(default=1, metadata={"min": 0})
    """keda: total load above which a model scaled to zero is woken."""
    cooldown_seconds: int = field(default=300, metadata={"min": 0})
    """keda: idle time before scaling to zero."""
    scale_down_stabilization_seconds: int = field(default=300, metadata={"min": 0, "max": 3600})
    scale_down_percent: int = field(default=50, metadata={"min": 1, "max": 100})
    scale_down_period_seconds: int = field(default=60, metadata={"min": 1, "max": 1800})
    scale_up_stabilization_seconds: int = field(default=0, metadata={"min": 0, "max": 3600})
    scale_up_percent: int = field(default=100, metadata={"min": 1, "max": 1000})
    scale_up_pods: int = field(default=2, metadata={"min": 1})
    scale_up_period_seconds: int = field(default=30, metadata={"min": 1, "max": 1800})


@dataclass(frozen=True)
class StorageConfig:
    size: str = field(default="500Gi", metadata=_quantity())
    storage_class: str = "fast-ssd"
    access_mode: Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"] = "ReadWriteMany"
    """Deployment replicas share one claim, so it must be mountable on several nodes (not ReadWriteOnce)."""
    claim_name: str = field(default="model-pvc", metadata={"dns": True})
    """PVC name for `workload: deployment`."""
    template_name: str = field(default="model-data", metadata={"dns": True})
    """volumeClaimTemplates name for `workload: statefulset` (one ReadWriteOnce volume per replica)."""
    restore_from_snapshot: str | None = field(default=None, metadata={"dns": True})
    """Name of a VolumeSnapshot in the namespace to create the model volume from. The restored claim gets a new
    name (`<claimName>-from-<snapshot>`), the pods roll onto it and the old claim is deleted after them."""


@dataclass(frozen=True)
class ProbeConfig:
    initial_delay_seconds: int = field(metadata={"min": 0})
    period_seconds: int = field(metadata={"min": 1})
    timeout_seconds: int = field(metadata={"min": 1})
    failure_threshold: int = field(metadata={"min": 1})


@dataclass(frozen=True)
class StartupProbeConfig:
    initial_delay_seconds: int = field(default=0, metadata={"min": 0})
    period_seconds: int = field(default=10, metadata={"min": 1})
    timeout_seconds: int = field(default=5, metadata={"min": 1})
    failure_threshold: int | None = field(default=None, metadata={"min": 1})
    """Unset: computed so that failureThreshold x periodSeconds covers the estimated model load time (at least
    30, the article's value); an explicit value that is too short is an error."""


@dataclass(frozen=True)
class ProbesConfig:
    liveness: ProbeConfig = field(default_factory=lambda: ProbeConfig(30, 10, 5, 3))
    readiness: ProbeConfig = field(default_factory=lambda: ProbeConfig(10, 5, 3, 3))
    startup: StartupProbeConfig = field(default_factory=StartupProbeConfig)


@dataclass(frozen=True)
class RolloutConfig:
    max_surge: int = field(default=1, metadata={"min": 0})
    """Extra pods during a rolling update (each needs spare GPUs in the quota and on nodes)."""
    max_unavailable: int = field(default=0, metadata={"min": 0})
    """Pods that may be down during a rolling update; use 1 with maxSurge 0 when no GPU is spare."""


Preset = Literal["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b",
                 "qwen2.5-72b",
                 "mistral-7b"]


@dataclass(frozen=True)
class SizingConfig:
    preset: Preset | None = None
    """A known architecture whose numbers the program has; or give the numbers below instead."""
    parameters_billion: float | None = field(default=None, metadata={"min": 0.001})
    layers: int | None = field(default=None, metadata={"min": 1})
    kv_heads: int | None = field(default=None, metadata={"min": 1})
    head_dim: int | None = field(default=None, metadata={"min": 1})
    attention_heads: int | None = field(default=None, metadata={"min": 1})
    """Optional; tensor parallelism (gpusPerReplica) must divide it."""
    dtype: Literal["bfloat16", "float16", "float8", "int4"] = "bfloat16"
    """Weight dtype; the builtin runtime loads bfloat16/float16 only, vLLM needs the matching `vllm.quantization` for
    float8 and int4. The KV cache is 16-bit unless `vllm.kvCacheDtype` is fp8 (required with float8)."""
    max_context_tokens: int | None = field(default=None, metadata={"min": 16})
    """Context window each sequence may use (prompt plus output); required. Sets MAX_MODEL_LEN."""
    max_concurrent_sequences: int | None = field(default=None, metadata={"min": 1})
    """Sequences decoded together per replica; required. Sets MAX_NUM_SEQS."""
    typical_context_tokens: int | None = field(default=None, metadata={"min": 1})
    """Prompt plus output of a typical request, for the plan's count of sequences the paged KV cache holds at that
    length; unset: a quarter of maxContextTokens."""


@dataclass(frozen=True)
class FillConfig:
    """How `models[].source` is copied onto the model volume (`python -m serving.fetch` in the serving image)."""

    secret_name: str | None = field(default=None, metadata={"dns": True})
    """Existing Secret with the source's credentials: key `HF_TOKEN` (hf) or `AWS_ACCESS_KEY_ID` and
    `AWS_SECRET_ACCESS_KEY` (s3), mounted as files for the fill only (never env, never the serving container).
    Unset: anonymous (public models) or the node's / workload identity."""
    hf_endpoint: str | None = None
    """Hub URL for a mirror or proxy; unset: https://huggingface.co."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint URL (MinIO, Ceph, R2, ...); unset: AWS S3."""
    s3_region: str = "us-east-1"
    image: str | None = None
    """Image with `serving.fetch`, pinned; unset: the model's image (required for runtime vllm)."""
    egress_cidrs: list[str] = field(default_factory=lambda: ["0.0.0.0/0"])
    """Where the fill may connect; `0.0.0.0/0` excludes the private and link-local ranges (cluster, cloud
    metadata). Narrow it to the source's addresses where they are fixed."""
    egress_namespaces: list[str] = field(default_factory=list)
    """Namespaces of an in-cluster source (e.g. MinIO)."""
    egress_port: int = field(default=443, metadata={"min": 1, "max": 65535})
    deadline_seconds: int = field(default=14400, metadata={"min": 60})
    """The fill Job's activeDeadlineSeconds, and how long `pulumi up` waits for it."""
    backoff_limit: int = field(default=6, metadata={"min": 0, "max": 100})
    """Pod retries; each resumes the partial download on the volume."""
    keep_revisions: int = field(default=2, metadata={"min": 1, "max": 100})
    """Revision directories kept on the volume (the current one and the previous, for instant rollback)."""
    verify: Literal["full", "size-only"] = "full"
    """How a serving pod checks the revision before its server starts (and a refill checks a finished one): `full`
    re-hashes every file against the manifest (a same-size overwrite is caught; reads the whole model at
    storageReadMBps, which the plan adds to the pod's start), `size-only` checks sizes."""
    require_checksums: bool | None = None
    """Fail a fill when a file has no checksum to check it by (an S3 object uploaded without S3 checksums, and no
    SHA256SUMS beside it); unset: on for stacks named prod*. Off, such files are checked by size and the manifest
    says so."""
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(
        requests=ResourceAmounts(cpu="1", memory="1Gi", ephemeral_storage="1Gi"),
        limits=ResourceAmounts(cpu="4", memory="4Gi", ephemeral_storage="2Gi")))
    """The downloader streams to the volume; it needs little memory and no GPU."""


VLLM_QUANTIZATION = {
    "float8": ("fp8", "fbgemm_fp8", "compressed-tensors", "modelopt"),
    "int4": ("awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors"),
}
"""vLLM `--quantization` methods by the weight dtype the capacity plan sizes (`sizing.dtype`)."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""`--max-lora-rank` choices of the pinned vLLM release."""


@dataclass(frozen=True)
class VllmConfig:
    """Settings of the vLLM runtime (`runtime: vllm`); each becomes the vLLM flag named beside it."""

    quantization: Literal["fp8", "fbgemm_fp8", "compressed-tensors", "modelopt", "awq", "awq_marlin", "gptq",
                          "gptq_marlin"] | None = None
    """`--quantization`: the checkpoint's (or online) quantization method; it must match `sizing.dtype` (float8:
    fp8, fbgemm_fp8, compressed-tensors, modelopt; int4: awq, awq_marlin, gptq, gptq_marlin, compressed-tensors).
    Unset: the weights load in bfloat16/float16."""
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None
    """`--kv-cache-dtype`; the plan sizes the KV cache at 1 byte per value for fp8*, 2 for auto. Required with
    `sizing.dtype: float8` (say which the plan should size); unset otherwise means auto. vLLM's other cache dtypes
    (fp4, int4, ...) are not offered: the plan cannot size them yet."""
    enable_prefix_caching: bool | None = None
    """`--enable-prefix-caching` / `--no-enable-prefix-caching`; unset: vLLM's default (on)."""
    max_num_batched_tokens: int | None = field(default=None, metadata={"min": 1})
    """`--max-num-batched-tokens`: tokens per engine step (chunked prefill); at least maxNumSeqs."""
    lora_adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served beside the base model: name -> pinned source (`hf://ORG/NAME@<sha>` or
    `s3://BUCKET/PREFIX`), filled onto the model volume like the base model; `--enable-lora --lora-modules`."""
    max_lora_rank: int | None = field(default=None, metadata={"min": 1})
    """`--max-lora-rank`, the largest adapter rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512)."""
    tool_call_parser: str | None = None
    """`--enable-auto-tool-choice --tool-call-parser NAME` (e.g. llama3_json, hermes, mistral)."""
    reasoning_parser: str | None = None
    """`--reasoning-parser NAME` (e.g. deepseek_r1, qwen3)."""
    extra_args: list[str] = field(default_factory=list)
    """Any other `vllm serve` flags (e.g. `--speculative-config {...}`); flags the settings above or the
    platform own are refused here."""

    @property
    def is_set(self) -> bool:
        return self != VllmConfig()


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(metadata={"dns": True})
    """Kubernetes name of this model's workload, Service, HPA, PDB."""
    served_model_name: str
    """MODEL_NAME: the model name clients send."""
    model_path: str | None = None
    """MODEL_PATH inside the container, under /models; required without a `source`. With an hf or s3 source it is
    the model's folder (default /models/<name>) and each revision is filled into its own directory inside it;
    with a pvc source it is /models/PATH."""
    source: str | None = None
    """Where the weights come from, pinned: `hf://ORG/NAME@<commit sha>`, `s3://BUCKET/PREFIX` or
    `pvc://CLAIM/PATH`. The volume is filled once (a Job, or an init container per StatefulSet replica) and the
    pods serve offline after checking the fill's manifest. Unset: the volume is filled by other means."""
    fill: FillConfig = field(default_factory=FillConfig)
    image: str | None = None
    """Serving image, pinned to a version tag or digest (never `latest`); required for the builtin runtime,
    defaults to the pinned official image for vllm."""
    runtime: Literal["builtin", "vllm"] = "builtin"
    """`builtin`: this project's serving image (one GPU per replica, bfloat16/float16 weights). `vllm`: the
    official vLLM OpenAI server image (tensor parallel, quantization, multi-node). Probes, autoscaling metrics and
    alerts follow the runtime's metric contract."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Settings for `runtime: vllm`."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    workload: Literal["deployment", "statefulset", "leaderworkerset"] = "deployment"
    """Deployment with one shared model claim, StatefulSet with one volume per replica, or LeaderWorkerSet (vLLM
    only): one group of pods per replica across gpusPerReplica / gpuPool.gpusPerNode nodes. Chosen automatically
    when gpusPerReplica is more than gpuPool.gpusPerNode and workload is not set."""
    replicas: int = field(default=2, metadata={"min": 1})
    """Starting replica count (the HPA owns it afterwards)."""
    gpus_per_replica: int = field(default=1, metadata={"min": 0, "max": 128})
    """GPUs per replica: 1 for the builtin runtime; vLLM splits a model across them (tensor parallel in a node,
    pipeline parallel across the nodes of a leaderworkerset); 0 runs on CPU (dev clusters)."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    rollout: RolloutConfig | None = None
    """Unset: computed from the quota. maxSurge 1 / maxUnavailable 0 when the GPU quota has room for one extra
    replica at maxReplicas (zero downtime), else maxSurge 0 / maxUnavailable 1."""
    sizing: SizingConfig | None = None
    """Model architecture and serving limits for the GPU-memory and startup checks (see the capacity plan)."""
    gpu_memory_utilization: float = field(default=0.9, metadata={"min": 0.1, "max": 1.0})
    """Fraction of each GPU's memory the engine may use (weights, KV cache, overhead)."""
    storage_read_mbps: float = field(default=250.0, metadata={"min": 1, "key": "storageReadMBps"})
    """Model volume read throughput (MB/s), for the load-time estimate behind the startup probe budget."""
    shm_size: str | None = field(default=None, metadata=_quantity())
    """/dev/shm size for multi-GPU and multi-node pods (NCCL; memory-backed, counted against the memory limit);
    unset: 2Gi per GPU of the pod, at most 16Gi."""
    service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = "ClusterIP"
    """Service type. ClusterIP behind the TLS Ingress (or the gateway) is the safe default: a LoadBalancer is plain
    HTTP from outside the cluster, so it needs `loadBalancerSourceRanges`, and its callers need
    `guardrails.allowFrom.ipBlocks`."""
    load_balancer_source_ranges: list[str] = field(default_factory=list)
    """CIDRs the cloud load balancer admits (required for serviceType LoadBalancer)."""
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    """For a LoadBalancer: `Local` keeps the client's address (no SNAT), which `allowFrom.ipBlocks` needs to
    match real callers."""
    service_port: int = field(default=80, metadata={"min": 1, "max": 65535})
    """Service port, forwarded to the container's port 8000 (`http`)."""
    host: str | None = None
    """Ingress host for this model; defaults to `ingress.host`."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the serving container (never secrets: they come from Secrets)."""
    max_num_seqs: int | None = field(default=None, metadata={"min": 1})
    """Concurrent sequences per replica (MAX_NUM_SEQS); the image picks a default when unset."""
    max_model_len: int | None = field(default=None, metadata={"min": 16})
    """Context window per sequence (MAX_MODEL_LEN)."""
    kv_block_size: int = 16
    """Tokens per block of the builtin engine's paged KV cache (BLOCK_SIZE); the plan counts blocks of this size
    (vLLM's own default is also 16)."""
    prefix_caching: bool = True
    """Builtin runtime: reuse the KV blocks of prompt prefixes seen before (ENABLE_PREFIX_CACHING); vLLM has
    `vllm.enablePrefixCaching`."""
    termination_grace_period_seconds: int = field(default=60, metadata={"min": 5, "max": 3600})
    drain_seconds: int = field(default=30, metadata={"min": 0, "max": 3600})
    """In-flight requests get this long to finish after SIGTERM; below the grace period."""

    nodes_per_replica: int = field(default=1, metadata={"internal": True})
    """Pods (nodes) in one replica's group: gpusPerReplica / gpuPool.gpusPerNode for a leaderworkerset, else 1."""

    @property
    def gpus_per_pod(self) -> int:
        return self.gpus_per_replica // self.nodes_per_replica


@dataclass(frozen=True)
class GatewayAutoscalingConfig:
    min_replicas: int = field(default=2, metadata={"min": 1})
    """Gateway replicas at least; two, so one survives a node drain (the PDB allows one down)."""
    max_replicas: int = field(default=6, metadata={"min": 1})
    target_cpu_utilization: int = field(default=70, metadata={"min": 1, "max": 100})
    """The gateway is CPU-bound (it relays every streamed token), so its HPA scales on CPU."""


@dataclass(frozen=True)
class GatewayConfig:
    """The stack's one OpenAI endpoint (`python -m serving.gateway` from the serving image, no GPU): routes by
    `model`, balances by load and prompt prefix, holds requests while a model starts from zero."""

    enabled: bool = False
    """Put the gateway in front of every model: one Ingress host for the stack, models reachable only through it
    (and by Prometheus). Needed for autoscaling.mode keda with minReplicas 0."""
    image: str | None = None
    """The serving image that runs the gateway, pinned; unset: the first builtin model's image."""
    replicas: int = field(default=2, metadata={"min": 1})
    """Starting replica count (the HPA owns it afterwards)."""
    autoscaling: GatewayAutoscalingConfig = field(default_factory=GatewayAutoscalingConfig)
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(
        requests=ResourceAmounts(cpu="1", memory="512Mi", ephemeral_storage="256Mi"),
        limits=ResourceAmounts(cpu="2", memory="1Gi", ephemeral_storage="512Mi")))
    cold_start_timeout_seconds: int | None = field(default=None, metadata={"min": 1, "max": 86400})
    """How long a request waits for a model with no ready pod before a 503; unset: each model's startup budget
    from the plan (its startup probe's failureThreshold x periodSeconds), plus the time to schedule a pod."""
    max_queue_per_model: int = field(default=256, metadata={"min": 1})
    """Requests the gateway holds per model (starting from zero, or every pod at maxInflightPerPod); more get 429."""
    max_inflight_per_pod: int | None = field(default=None, metadata={"min": 1})
    """Requests the gateway sends one model pod at once; unset: twice the model's maxNumSeqs (its slots, and as
    many again queued in the pod, so that a freed slot is filled at once)."""
    termination_grace_period_seconds: int = field(default=60, metadata={"min": 5, "max": 3600})
    drain_seconds: int = field(default=30, metadata={"min": 0, "max": 3600})
    """In-flight streams get this long to finish after SIGTERM; below the grace period."""


@dataclass(frozen=True)
class HelmAddon:
    enabled: bool = False
    version: str | None = None
    """Chart version; unset: the version this release of the platform was tested with."""
    namespace: str | None = field(default=None, metadata={"dns": True})
    """Namespace to install into (created); unset: the add-on's usual namespace."""
    values: dict[str, str] = field(default_factory=dict)
    """Extra chart values as dotted keys (`prometheus.prometheusSpec.retention: 15d`)."""


@dataclass(frozen=True)
class AddonsConfig:
    kube_prometheus_stack: HelmAddon = field(default_factory=HelmAddon)
    """Prometheus operator, Prometheus, Alertmanager, Grafana, kube-state-metrics."""
    prometheus_adapter: HelmAddon = field(default_factory=HelmAddon)
    """Serves the load-per-replica Pods metric to the HPA, with rules rendered from the metric contract."""
    keda: HelmAddon = field(default_factory=HelmAddon)
    """KEDA, for `autoscaling.mode: keda`."""
    nvidia_device_plugin: HelmAddon = field(default_factory=HelmAddon)
    """Advertises `nvidia.com/gpu` on the GPU nodes."""
    dcgm_exporter: HelmAddon = field(default_factory=HelmAddon)
    """GPU metrics (DCGM) for nodes and pods."""
    snapscheduler: HelmAddon = field(default_factory=HelmAddon)
    """backube/snapscheduler: takes the scheduled model-volume snapshots of `backups`."""
    leader_worker_set: HelmAddon = field(default_factory=HelmAddon)
    """kubernetes-sigs/lws: the LeaderWorkerSet controller and CRD, for `workload: leaderworkerset`."""


@dataclass(frozen=True)
class SnapshotClassConfig:
    name: str = field(default="llm-model-snapshots", metadata={"dns": True})
    """VolumeSnapshotClass the snapshots use."""
    driver: str | None = None
    """CSI driver (e.g. `ebs.csi.aws.com`, `pd.csi.storage.gke.io`): when set, the class is created;
    unset: `name` must already exist in the cluster."""
    deletion_policy: Literal["Retain", "Delete"] = "Retain"
    """Retain keeps the storage-side snapshot when its VolumeSnapshot object is deleted."""
    parameters: dict[str, str] = field(default_factory=dict)
    """Driver-specific parameters."""


@dataclass(frozen=True)
class BackupsConfig:
    enabled: bool = False
    """Snapshot every model volume on a schedule (needs a CSI driver with snapshots and the snapscheduler
    operator: `addons.snapscheduler`)."""
    schedule: str = "0 3 * * *"
    """Cron schedule (five fields, or @daily, @weekly, ...)."""
    retention: int = field(default=7, metadata={"min": 1})
    """Snapshots kept per volume; the oldest are deleted."""
    max_age: str | None = None
    """Also delete snapshots older than this (`720h`)."""
    snapshot_class: SnapshotClassConfig = field(default_factory=SnapshotClassConfig)


@dataclass(frozen=True)
class StackConfig:
    stack: str = ""
    """The stack name (set from Pulumi, not from config)."""
    namespace: str = field(default="ai-production", metadata={"dns": True})
    """Namespace for every namespaced object (created with Pod Security Admission labels)."""
    gpu_pool: GpuPoolConfig = field(default_factory=GpuPoolConfig)
    """GpuPool: GPU scheduling and the capacity that checks use."""
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    """Guardrails: quota, limits, disruption budget, network policies, API key."""
    ingress: IngressConfig = field(default_factory=IngressConfig)
    """Ingress with cert-manager TLS, shared by the models."""
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    """Metrics scraping, alerts and dashboard."""
    addons: AddonsConfig = field(default_factory=AddonsConfig)
    """Pinned Helm releases for what a cluster may lack, each switched on per stack."""
    models: list[ModelConfig] = field(default_factory=list)
    """One LLMServing per entry."""
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    """Scheduled CSI snapshots of the model volumes, with retention."""
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    """InferenceGateway: the stack's one OpenAI endpoint in front of every model."""
    require_digests: bool | None = None
    """Require every image by digest (`image:tag@sha256:...`), so what runs is exactly what was reviewed; unset:
    on for stacks named prod*."""
    require_pinned_sources: bool | None = None
    """Refuse `models[].source` revisions that can move (branches, tags); unset: on for stacks named prod*."""

    @property
    def total_gpus_at_max(self) -> int:
        return sum(model_max_replicas(model) * model.gpus_per_replica for model in self.models)


def model_min_replicas(model: ModelConfig) -> int:
    return model.autoscaling.min_replicas if model.autoscaling.enabled else model.replicas


def model_max_replicas(model: ModelConfig) -> int:
    return model.autoscaling.max_replicas if model.autoscaling.enabled else model.replicas


def model_host(cfg: StackConfig, model: ModelConfig) -> str | None:
    return model.host or cfg.ingress.host


def dns_name(*parts: str) -> str:
    """Join name parts with '-' into a DNS-1123 label (at most 63 characters, ending alphanumeric)."""
    return "-".join(parts)[:63].rstrip("-.")


def fill_job_name(model: ModelConfig, source_id: str) -> str:
    """One fill Job per model and source revision (and set of LoRA adapters): a new revision is a new Job."""
    if model.vllm.lora_adapters:
        import hashlib

        digest = hashlib.sha256(json.dumps(model.vllm.lora_adapters, sort_keys=True).encode()).hexdigest()[:6]
        source_id = f"{source_id}-{digest}"
    return dns_name(model.name[:45], "fill", source_id)


def lora_adapter_paths(model: ModelConfig, model_path: str | None = None) -> dict[str, str]:
    """Where each LoRA adapter's revision lives on the volume: beside the base model's revision directories
    (`<model folder>/lora-<name>/<revision>`)."""
    path = model_path or model.model_path
    if not model.vllm.lora_adapters or path is None:
        return {}
    folder = path.rsplit("/", 1)[0]
    return {name: f"{folder}/lora-{name}/{parse_source(source).directory}"
            for name, source in sorted(model.vllm.lora_adapters.items())}


LWS_API = "leaderworkerset.x-k8s.io/v1"


def workload_name(model: ModelConfig) -> str:
    """The workload object's name. A LeaderWorkerSet gets its own: its controller creates a headless Service
    named after it, which must not collide with the model's Service."""
    return f"{model.name}-lws" if model.workload == "leaderworkerset" else model.name


def tls_secret_name(cfg: StackConfig, model: ModelConfig) -> str | None:
    """cert-manager writes the certificate (and names the Certificate) after this secret."""
    if not (cfg.ingress.enabled and cfg.ingress.tls):
        return None
    return cfg.ingress.tls_secret_name if len(cfg.models) == 1 else f"{model.name}-tls"


def hpa_name(model: ModelConfig) -> str | None:
    """The HorizontalPodAutoscaler that scales the model: ours, or the one KEDA creates for its ScaledObject."""
    if not model.autoscaling.enabled:
        return None
    return f"{model.name}-hpa" if model.autoscaling.mode == "hpa" else f"keda-hpa-{model.name}"


# --------------------------------------------------------------------------------------------------
# Reading: YAML values -> dataclasses, by type hints.
# --------------------------------------------------------------------------------------------------


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def config_key(dataclass_field: dataclasses.Field) -> str:
    """The YAML key of a dataclass field: camelCase, unless the field names its key explicitly."""
    return dataclass_field.metadata.get("key", camel(dataclass_field.name))


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(tp) if arg is not type(None))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of objects" if dataclasses.is_dataclass(item) else f"a list of {type_name(item)}"
    if origin is dict:
        return "a map of strings"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(tp, str(tp))


class ConfigReader:
    def __init__(self, stack: str):
        self.stack = stack

    def fail(self, path: str, problem: str) -> typing.NoReturn:
        raise ConfigError(self.stack, path, problem)

    def read(self, tp: Any, value: Any, path: str, meta: Mapping[str, Any], base: Any = None) -> Any:
        """Read `value` as type `tp`; a nested object merges over `base`, its default."""
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
            if value is None:
                return None
            return self.read(args[0], value, path, meta, base)
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                self.fail(path, f"{value!r} is not allowed; use {type_name(tp)}")
            return value
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.read_object(tp, value, path, base)
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"{value!r} is not {type_name(tp)}")
            (item,) = typing.get_args(tp)
            return [self.read(item, v, f"{path}[{i}]", {}) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                self.fail(path, f"{value!r} is not a map of strings")
            out = {}
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    self.fail(f"{path}.{k}", f"{v!r} is not a string")
                out[k] = str(v)
            return out
        return self.read_scalar(tp, value, path, meta)

    def read_scalar(self, tp: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
        if meta.get("quantity"):
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                self.fail(path, f"{value!r} is not a Kubernetes quantity (examples: 500m, 4, 8Gi)")
            try:
                amount = parse_quantity(value)
            except QuantityError as exc:
                self.fail(path, str(exc))
            if amount < 0:
                self.fail(path, f"{value!r} is negative; quantities must be zero or more")
            return str(value)
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"{value!r} is not true or false")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"{value!r} is not an integer")
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"{value!r} is not a number")
            value = float(value)
        elif tp is str:
            if not isinstance(value, str) or not value:
                self.fail(path, f"{value!r} is not a non-empty string")
            if meta.get("dns") and (len(value) > 63 or not _DNS1123_LABEL.match(value)):
                self.fail(path, f"{value!r} is not a valid Kubernetes name (DNS-1123 label: lowercase letters, "
                                "digits and '-', starting and ending alphanumeric, at most 63 characters)")
            return value
        if "min" in meta and value < meta["min"]:
            self.fail(path, f"{value!r} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            self.fail(path, f"{value!r} is above the maximum {meta['max']}")
        return value

    def read_object(self, cls: type, value: Any, path: str, base: Any = None) -> Any:
        """Keys present override; keys absent keep `base`'s value (a field's default object), else the class
        default. So `probes: {startup: {failureThreshold: 60}}` changes one number and keeps the rest."""
        if not isinstance(value, dict):
            self.fail(path, f"{value!r} is not an object with keys {self._keys(cls)}")
        hints = typing.get_type_hints(cls)
        by_key = {config_key(f): f for f in config_fields(cls)}
        unknown = sorted(set(value) - set(by_key))
        if unknown:
            self.fail(f"{path}.{unknown[0]}" if path else unknown[0],
                      f"unknown key; allowed keys here: {self._keys(cls)}")
        kwargs = {}
        for key, dataclass_field in by_key.items():
            sub = f"{path}.{key}" if path else key
            default = getattr(base, dataclass_field.name) if base is not None else field_default(dataclass_field)
            if key in value:
                kwargs[dataclass_field.name] = self.read(hints[dataclass_field.name], value[key], sub,
                                                         dataclass_field.metadata, default)
            elif base is not None:
                kwargs[dataclass_field.name] = default
            elif default is dataclasses.MISSING:
                self.fail(sub, "is required")
        return cls(**kwargs)

    @staticmethod
    def _keys(cls: type) -> str:
        return ", ".join(config_key(f) for f in config_fields(cls))


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a stack file may set (not the stack name or computed ones)."""
    return [f for f in dataclasses.fields(cls) if f.name != "stack" and not f.metadata.get("internal")]


def field_default(dataclass_field: dataclasses.Field) -> Any:
    if dataclass_field.default is not dataclasses.MISSING:
        return dataclass_field.default
    if dataclass_field.default_factory is not dataclasses.MISSING:
        return dataclass_field.default_factory()
    return dataclasses.MISSING


def resolve_layout(cfg: StackConfig, values: Mapping[str, Any]) -> StackConfig:
    """A replica that needs more GPUs than one node has runs as a LeaderWorkerSet unless the stack names a
    workload; a LeaderWorkerSet's group has one pod per node."""
    per_node = cfg.gpu_pool.gpus_per_node
    raw_models = values.get("models") or []
    models = []
    for i, model in enumerate(cfg.models):
        named = isinstance(raw_models[i], dict) and "workload" in raw_models[i]
        if not named and per_node and model.gpus_per_replica > per_node:
            model = dataclasses.replace(model, workload="leaderworkerset")
        if model.workload == "leaderworkerset" and per_node and model.gpus_per_replica % per_node == 0:
            model = dataclasses.replace(model, nodes_per_replica=max(1, model.gpus_per_replica // per_node))
        models.append(model)
    return dataclasses.replace(cfg, models=models)


def parse_config(stack: str, values: Mapping[str, Any]) -> StackConfig:
    """Read and validate a StackConfig from `{key: value}` with the `llm-platform:` prefix removed (not yet planned:
    `llm_platform.stack` composes this with the plan)."""
    reader = ConfigReader(stack)
    cfg = reader.read_object(StackConfig, dict(values), "")
    cfg = dataclasses.replace(cfg, stack=stack)
    cfg = resolve_layout(cfg, values)
    validate(cfg, reader)
    return cfg


# --------------------------------------------------------------------------------------------------
# Cross-field rules.
# --------------------------------------------------------------------------------------------------


def validate(cfg: StackConfig, reader: ConfigReader) -> None:
    if not cfg.models:
        reader.fail("models", "no model is configured; add at least one entry with name, servedModelName, "
                              "modelPath and image")
    _validate_gpu_pool(cfg, reader)
    _validate_guardrails(cfg, reader)
    _validate_backups(cfg, reader)
    if cfg.ingress.host is not None and not _HOSTNAME.match(cfg.ingress.host):
        reader.fail("ingress.host", f"{cfg.ingress.host!r} is not a valid host name such as llm-api.example.com")
    names: dict[str, int] = {}
    served: dict[str, int] = {}
    hosts: dict[str, int] = {}
    for i, model in enumerate(cfg.models):
        key_path = f"models[{i}]"
        if model.name in names:
            reader.fail(f"{key_path}.name", f"{model.name!r} is already used by models[{names[model.name]}]; "
                                            "each model needs its own name")
        names[model.name] = i
        if cfg.gateway.enabled and model.served_model_name in served:
            reader.fail(f"{key_path}.servedModelName", f"{model.served_model_name!r} is already served by "
                                                       f"models[{served[model.served_model_name]}]; the gateway routes "
                                                       "by this name, so each model needs its own")
        served[model.served_model_name] = i
        _validate_model(cfg, model, key_path, reader)
        host = model_host(cfg, model)
        if cfg.gateway.enabled:
            if model.host is not None:
                reader.fail(f"{key_path}.host", f"{model.host!r}: with gateway.enabled every model is served at the "
                                                "gateway's one host (ingress.host); remove models[].host")
        elif cfg.ingress.enabled:
            if host is None:
                reader.fail(f"{key_path}.host", "no Ingress host: set ingress.host (one model) or models[].host, "
                                                "or set ingress.enabled: false")
            if host in hosts:
                reader.fail(f"{key_path}.host", f"{host!r} is already the host of models[{hosts[host]}]; the OpenAI "
                                                "API paths are the same for every model, so each model needs its own "
                                                "host")
            hosts[host] = i
    _validate_shared_claims(cfg, reader)
    _validate_gateway(cfg, reader)


def gateway_image(cfg: StackConfig) -> str | None:
    """gateway.image, else the serving image the stack already names: the first builtin model's image, or a
    model's fill image (the gateway and the downloader ship in the same image)."""
    return cfg.gateway.image \
        or next((model.image for model in cfg.models if model.runtime == "builtin" and model.image), None) \
        or next((model.fill.image for model in cfg.models if model.fill.image), None)


def _validate_gateway(cfg: StackConfig, reader: ConfigReader) -> None:
    gw = cfg.gateway
    if not gw.enabled:
        return
    image = gateway_image(cfg)
    if image is None:
        reader.fail("gateway.image", "is required when no model names the llm-platform serving image (as its image or "
                                     "fill.image): that image, which holds python -m serving.gateway, pinned to a "
                                     "version")
    _check_pinned_image(image, "gateway.image", reader, require_digests(cfg))
    if cfg.ingress.enabled and cfg.ingress.host is None:
        reader.fail("ingress.host", "is required with gateway.enabled: the gateway is the stack's one endpoint, served "
                                    "at this host (e.g. llm-api.example.com)")
    autoscaling = gw.autoscaling
    if autoscaling.max_replicas < autoscaling.min_replicas:
        reader.fail("gateway.autoscaling.maxReplicas", f"{autoscaling.max_replicas} is below minReplicas "
                                                       f"{autoscaling.min_replicas}")
    if not autoscaling.min_replicas <= gw.replicas <= autoscaling.max_replicas:
        reader.fail("gateway.replicas", f"{gw.replicas} is outside gateway.autoscaling minReplicas..maxReplicas "
                                        f"({autoscaling.min_replicas}..{autoscaling.max_replicas})")
    req, lim = gw.resources.requests, gw.resources.limits
    for res in ("cpu", "memory", "ephemeral_storage"):
        if parse_quantity(getattr(req, res)) > parse_quantity(getattr(lim, res)):
            reader.fail(f"gateway.resources.requests.{camel(res)}",
                        f"{getattr(req, res)} is above the limit {getattr(lim, res)}; requests must not exceed limits")
    _check_drain_fits("gateway", gw.drain_seconds, gw.termination_grace_period_seconds, reader)


def _check_drain_fits(key_path: str, drain: int, grace: int, reader: ConfigReader) -> None:
    needed = PRESTOP_SLEEP_SECONDS + drain + SHUTDOWN_AFTER_DRAIN_SECONDS
    if needed > grace:
        reader.fail(f"{key_path}.drainSeconds", f"{drain} does not fit terminationGracePeriodSeconds {grace}: the pod "
                                                f"needs {PRESTOP_SLEEP_SECONDS} s preStop + {drain} s drain + "
                                                f"{SHUTDOWN_AFTER_DRAIN_SECONDS} s shutdown = {needed} s, or the "
                                                "kubelet kills it mid-drain; lower drainSeconds to "
                                                f"{grace - PRESTOP_SLEEP_SECONDS - SHUTDOWN_AFTER_DRAIN_SECONDS} or "
                                                f"raise the grace period to {needed}")


def _validate_gpu_pool(cfg: StackConfig, reader: ConfigReader) -> None:
    pool = cfg.gpu_pool
    for key in pool.node_selector:
        if not _LABEL_KEY.match(key):
            reader.fail(f"gpuPool.nodeSelector.{key}", f"{key!r} is not a valid label key")
    for i, tol in enumerate(pool.tolerations):
        if tol.operator == "Exists" and tol.value is not None:
            reader.fail(f"gpuPool.tolerations[{i}].value", f"{tol.value!r} must be unset with operator Exists "
                                                           "(use operator Equal to match a value)")


def _validate_guardrails(cfg: StackConfig, reader: ConfigReader) -> None:
    guardrails = cfg.guardrails
    if not re.fullmatch(r"v1\.\d{1,2}", guardrails.pod_security_version):
        reader.fail("guardrails.podSecurityVersion", f"{guardrails.pod_security_version!r} is not a pinned Kubernetes "
                                                     "version such as v1.33 (`latest` would change the rules under "
                                                     "running pods at the next cluster upgrade)")
    if guardrails.pdb.max_unavailable is not None and guardrails.pdb.min_available is not None:
        reader.fail("guardrails.pdb", "set maxUnavailable or minAvailable, not both")
    if guardrails.pdb.max_unavailable is None and guardrails.pdb.min_available is None:
        reader.fail("guardrails.pdb", "set maxUnavailable (recommended: 1) or minAvailable")
    if guardrails.pdb.max_unavailable == 0:
        reader.fail("guardrails.pdb.maxUnavailable", "0 allows no voluntary disruption, so every node drain and "
                                                     "cluster upgrade blocks forever; use 1 or more")
    for i, ns in enumerate(guardrails.allow_from.namespaces + guardrails.egress_to.namespaces):
        if not _DNS1123_LABEL.match(ns):
            where = "allowFrom" if i < len(guardrails.allow_from.namespaces) else "egressTo"
            reader.fail(f"guardrails.{where}.namespaces", f"{ns!r} is not a valid namespace name")
    for i, port in enumerate(guardrails.egress_to.ports):
        if not 1 <= port <= 65535:
            reader.fail(f"guardrails.egressTo.ports[{i}]", f"{port} is not a port (1-65535)")
    for i, cidr in enumerate(guardrails.allow_from.ip_blocks):
        if not _CIDR.fullmatch(cidr):
            reader.fail(f"guardrails.allowFrom.ipBlocks[{i}]", f"{cidr!r} is not a CIDR such as 10.0.0.0/8")
    for cls, size in guardrails.resource_quota.storage_by_class.items():
        try:
            parse_quantity(size)
        except QuantityError as exc:
            reader.fail(f"guardrails.resourceQuota.storageByClass.{cls}", str(exc))


def _validate_model(cfg: StackConfig, model: ModelConfig, key_path: str, reader: ConfigReader) -> None:
    if model.image is None:
        if model.runtime == "builtin":
            reader.fail(f"{key_path}.image", "is required for runtime builtin: the serving image built from serving/, "
                                             "pinned to a version (e.g. registry.example.com/llm-serving:1.0.0)")
        return _validate_model_rest(cfg, model, key_path, reader)
    _check_pinned_image(model.image, f"{key_path}.image", reader, require_digests(cfg))
    _validate_model_rest(cfg, model, key_path, reader)


# Tags that name a branch or a channel: they move to new builds, so they pin nothing.
MOVING_TAGS = frozenset({"latest", "main", "master", "trunk", "head", "dev", "devel", "develop", "development",
                         "edge", "nightly", "canary", "next", "unstable", "stable", "beta", "alpha", "release",
                         "staging", "prod", "production", "test"})
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def require_digests(cfg: StackConfig) -> bool:
    return cfg.require_digests if cfg.require_digests is not None else cfg.stack.startswith("prod")


def parse_image(image: str) -> tuple[str, str | None, str | None]:
    """`registry/name:tag@sha256:...` -> (name, tag or None, digest or None)."""
    rest, _, digest = image.partition("@")
    name, _, tag = rest.rpartition(":")
    if "/" in tag or not name:  # a registry port (`host:5000/name`), not a tag
        name, tag = rest, ""
    return name, tag or None, digest or None


def _check_pinned_image(image: str, path: str, reader: ConfigReader, digests: bool = False) -> None:
    name, tag, digest = parse_image(image)
    if digest is not None and not _DIGEST.fullmatch(digest):
        reader.fail(path, f"{image!r}: {digest!r} is not a digest; write @sha256: and the 64 hex digits the registry "
                          "reports for the image")
    if tag is not None and tag.lower() in MOVING_TAGS:
        reader.fail(path, f"{image!r} is not pinned: {tag!r} names a branch or channel that moves to new builds; use a "
                          "version tag such as registry.example.com/llm-serving:1.0.0, or a digest")
    if tag is None and digest is None:
        reader.fail(path, f"{image!r} is not pinned; use a version tag or digest such as "
                          "registry.example.com/llm-serving:1.0.0 (never `latest` or no tag)")
    if digests and digest is None:
        reader.fail(path, f"{image!r} has no digest, and this stack requires digests (stacks named prod*, or "
                          f"requireDigests): append the digest the registry reports, as {name}:{tag}@sha256:<64 hex>, "
                          "so that what runs is exactly the image that was reviewed")


def _validate_model_rest(cfg: StackConfig, model: ModelConfig, key_path: str, reader: ConfigReader) -> None:
    _validate_source(cfg, model, key_path, reader)
    for key in model.env:
        if not _ENV_NAME.match(key):
            reader.fail(f"{key_path}.env.{key}", f"{key!r} is not a valid environment variable name")
        if key == "NVIDIA_VISIBLE_DEVICES":
            reader.fail(f"{key_path}.env.{key}", "must not be set: `all` exposes every GPU on the node to the pod; "
                                                 "the NVIDIA device plugin assigns GPUs through gpusPerReplica")
        if key in _MANAGED_ENV:
            reader.fail(f"{key_path}.env.{key}", f"is set by the platform from {_MANAGED_ENV[key]}; set that instead")
    _validate_runtime(cfg, model, key_path, reader)
    req, lim = model.resources.requests, model.resources.limits
    for res in ("cpu", "memory", "ephemeral_storage"):
        if parse_quantity(getattr(req, res)) > parse_quantity(getattr(lim, res)):
            reader.fail(f"{key_path}.resources.requests.{camel(res)}",
                        f"{getattr(req, res)} is above the limit {getattr(lim, res)}; requests must not exceed limits")
    if parse_quantity(lim.cpu) < MIN_SERVING_CPU:
        reader.fail(f"{key_path}.resources.limits.cpu",
                    f"{lim.cpu} is below {MIN_SERVING_CPU}: the container runs its HTTP server and its engine in two "
                    "processes (both runtimes), each busy on a core of its own while it streams, and under a smaller "
                    f"limit they throttle each other and streams stall; set at least {MIN_SERVING_CPU}")
    autoscaling = model.autoscaling
    if autoscaling.enabled and autoscaling.min_replicas == 0 and autoscaling.mode != "keda":
        reader.fail(f"{key_path}.autoscaling.minReplicas", "0 needs mode: keda (an HPA cannot scale to zero); use 1 or "
                                                           "more, or set autoscaling.mode: keda")
    if autoscaling.enabled and autoscaling.mode == "keda" and autoscaling.min_replicas == 0 and not cfg.gateway.enabled:
        reader.fail(f"{key_path}.autoscaling.minReplicas",
                    "0 needs gateway.enabled: true; at zero replicas no pod exports the load KEDA reads, so nothing "
                    "would ever wake the model, and requests would fail at once instead of being held; turn the "
                    "gateway on (it holds the first request and its pending count wakes the model) or use minReplicas "
                    "1")
    if autoscaling.enabled and autoscaling.mode == "keda" and cfg.guardrails.pdb.min_available is not None \
            and autoscaling.min_replicas == 0:
        reader.fail("guardrails.pdb.minAvailable", "a model that scales to zero needs maxUnavailable, not minAvailable")
    if autoscaling.enabled:
        if autoscaling.max_replicas < autoscaling.min_replicas:
            reader.fail(f"{key_path}.autoscaling.maxReplicas", f"{autoscaling.max_replicas} is below minReplicas "
                                                               f"{autoscaling.min_replicas}")
        if not autoscaling.min_replicas <= model.replicas <= autoscaling.max_replicas:
            reader.fail(f"{key_path}.replicas", f"{model.replicas} is outside autoscaling minReplicas..maxReplicas "
                                                f"({autoscaling.min_replicas}..{autoscaling.max_replicas})")
    pdb = cfg.guardrails.pdb
    low = model_min_replicas(model)
    if pdb.min_available is not None and pdb.min_available >= low:
        reader.fail("guardrails.pdb.minAvailable",
                    f"{pdb.min_available} leaves no voluntary disruption for {key_path} ({model.name}) at its minimum "
                    f"of {low} replica(s), so node drains block forever; use maxUnavailable: 1 or minAvailable <= "
                    f"{low - 1}")
    if model.workload == "deployment" and model.storage.access_mode in ("ReadWriteOnce", "ReadWriteOncePod") \
            and model_max_replicas(model) > 1:
        reader.fail(f"{key_path}.storage.accessMode",
                    f"{model.storage.access_mode} cannot be shared by up to {model_max_replicas(model)} Deployment "
                    "replicas on different nodes (they hang in ContainerCreating); use ReadOnlyMany or ReadWriteMany, "
                    "or workload: statefulset for one volume per replica")
    if model.workload == "leaderworkerset" and model.storage.access_mode in ("ReadWriteOnce", "ReadWriteOncePod"):
        reader.fail(f"{key_path}.storage.accessMode",
                    f"{model.storage.access_mode} cannot be mounted by the {model.nodes_per_replica} nodes of a "
                    "LeaderWorkerSet group (every node reads the same model revision from one shared claim); use "
                    "ReadWriteMany")
    if model.rollout is not None and model.rollout.max_surge == 0 and model.rollout.max_unavailable == 0:
        reader.fail(f"{key_path}.rollout", "maxSurge 0 and maxUnavailable 0 can never make progress; "
                                           "use maxSurge 1 (needs spare GPU quota) or maxUnavailable 1")
    _check_drain_fits(key_path, model.drain_seconds, model.termination_grace_period_seconds, reader)
    _validate_exposure(cfg, model, key_path, reader)
    if model.host is not None and not _HOSTNAME.match(model.host):
        reader.fail(f"{key_path}.host", f"{model.host!r} is not a valid host name such as llm-api.example.com")
    if model.workload == "statefulset" and model.storage.access_mode != "ReadWriteOnce":
        reader.fail(f"{key_path}.storage.accessMode", f"{model.storage.access_mode!r}: a StatefulSet gets one volume "
                                                      "per replica from volumeClaimTemplates; use ReadWriteOnce")


def _validate_exposure(cfg: StackConfig, model: ModelConfig, key_path: str, reader: ConfigReader) -> None:
    """A model reachable from outside the cluster only over TLS, or through an explicit, narrowed load balancer."""
    for i, cidr in enumerate(model.load_balancer_source_ranges):
        if not _CIDR.fullmatch(cidr):
            reader.fail(f"{key_path}.loadBalancerSourceRanges[{i}]", f"{cidr!r} is not a CIDR such as 203.0.113.0/24")
    if model.service_type != "LoadBalancer":
        if model.load_balancer_source_ranges:
            reader.fail(f"{key_path}.loadBalancerSourceRanges", "is only for serviceType LoadBalancer (this model's "
                                                                f"Service is {model.service_type})")
        return
    if cfg.gateway.enabled:
        reader.fail(f"{key_path}.serviceType", "LoadBalancer: with gateway.enabled the model pods accept only the "
                                               "gateway and Prometheus, so a load balancer would lead nowhere; clients "
                                               "use the gateway's endpoint; use ClusterIP")
    if not model.load_balancer_source_ranges:
        reader.fail(f"{key_path}.serviceType", "LoadBalancer without loadBalancerSourceRanges publishes plain HTTP "
                                               "(API keys, prompts, /metrics) to the whole internet beside the TLS "
                                               "Ingress; use ClusterIP behind the Ingress, or list the callers' CIDRs "
                                               "in loadBalancerSourceRanges")
    if cfg.guardrails.allow_from.ip_blocks and model.external_traffic_policy != "Local":
        reader.fail(f"{key_path}.externalTrafficPolicy", f"{model.external_traffic_policy}: with "
                                                         "guardrails.allowFrom.ipBlocks the load balancer must keep "
                                                         "the client's address, or the NetworkPolicy sees a node's "
                                                         "address instead and drops every caller; use Local")


def _validate_shared_claims(cfg: StackConfig, reader: ConfigReader) -> None:
    """Each model on a shared claim (Deployment, LeaderWorkerSet) that the platform fills owns its claim: two would
    create the same PVC, and one's fill would prune the other's revision directories."""
    owners: dict[str, int] = {}
    for i, model in enumerate(cfg.models):
        if model.workload == "statefulset" or (model.source and parse_source(model.source).kind == "pvc"):
            continue
        claim = model.storage.claim_name
        if claim in owners:
            reader.fail(f"models[{i}].storage.claimName",
                        f"{claim!r} is already the model claim of models[{owners[claim]}] "
                        f"({cfg.models[owners[claim]].name}); each model's volume is its own claim (one model's fill "
                        "would prune the other's revisions); give it its own claimName, or serve a shared volume "
                        "through a pvc:// source")
        owners[claim] = i
_VLLM_OWNED_FLAGS = {
    "model": "modelPath / source", "served-model-name": "servedModelName", "host": "the platform (0.0.0.0)",
    "port": "the platform (8000)", "api-key": "the generated API-key Secret (a mounted file)",
    "tensor-parallel-size": "gpusPerReplica", "pipeline-parallel-size": "gpusPerReplica / gpuPool.gpusPerNode",
    "distributed-executor-backend": "the workload (mp; across nodes on a leaderworkerset)",
    "nnodes": "the leaderworkerset group", "node-rank": "the leaderworkerset group",
    "master-addr": "the leaderworkerset group", "master-port": "the leaderworkerset group",
    "headless": "the leaderworkerset group", "data-parallel-size": "replicas (one engine per replica)",
    "gpu-memory-utilization": "gpuMemoryUtilization", "max-model-len": "sizing.maxContextTokens / maxModelLen",
    "max-num-seqs": "sizing.maxConcurrentSequences / maxNumSeqs", "dtype": "sizing.dtype",
    "quantization": "vllm.quantization", "kv-cache-dtype": "vllm.kvCacheDtype",
    "enable-prefix-caching": "vllm.enablePrefixCaching", "max-num-batched-tokens": "vllm.maxNumBatchedTokens",
    "enable-lora": "vllm.loraAdapters", "lora-modules": "vllm.loraAdapters", "max-lora-rank": "vllm.maxLoraRank",
    "tool-call-parser": "vllm.toolCallParser", "enable-auto-tool-choice": "vllm.toolCallParser",
    "reasoning-parser": "vllm.reasoningParser", "download-dir": "the model volume (the pods serve offline)",
}
"""`vllm serve` flags the platform sets from typed config; `vllm.extraArgs` may not set them."""
_PARSER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_ADAPTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")


def owned_vllm_flag(arg: str) -> str | None:
    """The owned flag an extra argument sets (`--max-model-len=4096`, `--max_model_len`, `--no-enable-...`)."""
    if not arg.startswith("-"):
        return None
    name = arg.lstrip("-").split("=", 1)[0].replace("_", "-")
    for candidate in (name, name[3:] if name.startswith("no-") else name):
        if candidate in _VLLM_OWNED_FLAGS:
            return candidate
    return None


KV_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The block sizes the builtin engine accepts (its BLOCK_SIZE; tests/platform/test_kv_plan.py keeps them equal)."""


def _validate_runtime(cfg: StackConfig, model: ModelConfig, key_path: str, reader: ConfigReader) -> None:
    """What the chosen runtime and workload can actually run: refused here rather than failing at load."""
    per_node = cfg.gpu_pool.gpus_per_node
    dtype = model.sizing.dtype if model.sizing else "bfloat16"
    if model.runtime == "builtin":
        if model.gpus_per_replica > 1:
            reader.fail(f"{key_path}.gpusPerReplica", f"{model.gpus_per_replica}: the builtin engine loads a model "
                                                      "onto one GPU (the others would sit idle while it runs out of "
                                                      "memory); use 1, or runtime: vllm, which splits a model across "
                                                      "GPUs (tensor parallel)")
        if dtype in ("float8", "int4"):
            reader.fail(f"{key_path}.sizing.dtype", f"{dtype!r}: the builtin engine loads bfloat16 or float16 weights "
                                                    "only; use runtime: vllm with vllm.quantization for quantized "
                                                    "weights")
        if model.vllm.is_set:
            reader.fail(f"{key_path}.vllm", "is for runtime: vllm; the builtin engine takes none of these settings")
        if model.workload == "leaderworkerset":
            reader.fail(f"{key_path}.workload", "'leaderworkerset' runs vLLM across nodes; use runtime: vllm")
        if model.kv_block_size not in KV_BLOCK_SIZES:
            reader.fail(f"{key_path}.kvBlockSize", f"{model.kv_block_size} is not a block size the builtin engine "
                                                   f"takes; use one of {', '.join(map(str, KV_BLOCK_SIZES))}")
    else:
        _validate_vllm(model, dtype, key_path, reader)
        if model.kv_block_size != 16:
            reader.fail(f"{key_path}.kvBlockSize", f"{model.kv_block_size}: is the builtin engine's setting; vLLM "
                                                   "keeps its own block size (16)")
        if not model.prefix_caching:
            reader.fail(f"{key_path}.prefixCaching", "is the builtin engine's setting; for vLLM set "
                                                     "vllm.enablePrefixCaching: false")
    if model.sizing and model.sizing.typical_context_tokens and model.sizing.max_context_tokens \
            and model.sizing.typical_context_tokens > model.sizing.max_context_tokens:
        reader.fail(f"{key_path}.sizing.typicalContextTokens", f"{model.sizing.typical_context_tokens} is above "
                                                               f"maxContextTokens {model.sizing.max_context_tokens}; "
                                                               "a typical request fits the window")
    if model.workload != "leaderworkerset":
        if model.gpus_per_replica and per_node and model.gpus_per_replica > per_node:
            reader.fail(f"{key_path}.gpusPerReplica", f"{model.gpus_per_replica} is more than gpuPool.gpusPerNode "
                                                      f"{per_node}; a {model.workload} pod cannot span nodes; use "
                                                      "workload: leaderworkerset (runtime vllm, one group of pods per "
                                                      "replica across nodes)")
        return
    if not per_node:
        reader.fail("gpuPool.gpusPerNode", f"is required for {key_path}.workload leaderworkerset: the group has one "
                                           "pod per node, so the platform must know how many GPUs a node has")
    if model.gpus_per_replica <= per_node or model.gpus_per_replica % per_node:
        reader.fail(f"{key_path}.gpusPerReplica", f"{model.gpus_per_replica} with workload leaderworkerset must be a "
                                                  f"multiple of gpuPool.gpusPerNode {per_node} above it (2 nodes or "
                                                  f"more: {per_node * 2}, {per_node * 3}, ...); a model that fits one "
                                                  "node runs as workload: deployment with tensor parallel inside the "
                                                  "node")
    if len(model.name) > 50:
        reader.fail(f"{key_path}.name", f"{model.name!r} is too long for a LeaderWorkerSet ({len(model.name)} "
                                        "characters): its pods are named <name>-lws-<group>-<index> and must stay a "
                                        "DNS label; use at most 50")


def _validate_vllm(model: ModelConfig, dtype: str, key_path: str, reader: ConfigReader) -> None:
    vllm = model.vllm
    quantization_key = f"{key_path}.vllm.quantization"
    if dtype in VLLM_QUANTIZATION:
        allowed = VLLM_QUANTIZATION[dtype]
        if vllm.quantization is None:
            reader.fail(quantization_key, f"is required with sizing.dtype {dtype!r}: without it vLLM loads 16-bit "
                                          "weights and the plan's memory is wrong; use the checkpoint's method, one of "
                                          f"{', '.join(allowed)}")
        if vllm.quantization not in allowed:
            reader.fail(quantization_key, f"{vllm.quantization!r} does not give {dtype} weights as sizing.dtype says; "
                                          f"use one of {', '.join(allowed)}, or change sizing.dtype")
    elif vllm.quantization is not None:
        reader.fail(quantization_key, f"{vllm.quantization!r} quantizes the weights, but sizing.dtype is {dtype!r} "
                                      "(the plan sizes 16-bit weights); set sizing.dtype to float8 or int4 to match, "
                                      "or remove quantization")
    if dtype == "float8" and vllm.kv_cache_dtype is None:
        reader.fail(f"{key_path}.vllm.kvCacheDtype", "is required with sizing.dtype 'float8': fp8 weights do not make "
                                                     "an fp8 KV cache; set fp8 (the plan sizes 1 byte per KV value) or "
                                                     "auto (2 bytes)")
    seqs = model.max_num_seqs or (model.sizing.max_concurrent_sequences if model.sizing else None)
    if vllm.max_num_batched_tokens is not None and seqs and vllm.max_num_batched_tokens < seqs:
        reader.fail(f"{key_path}.vllm.maxNumBatchedTokens", f"{vllm.max_num_batched_tokens} is below maxNumSeqs "
                                                            f"{seqs}; vLLM refuses to start (each step must fit one "
                                                            "token per sequence)")
    for name, source in vllm.lora_adapters.items():
        key = f"{key_path}.vllm.loraAdapters.{name}"
        if not _ADAPTER_NAME.match(name) or len(name) > 63:
            reader.fail(key, f"{name!r} is not a valid adapter name (lowercase letters, digits, '-', '.' and '_'); "
                             "clients send it as the model")
        if name == model.served_model_name:
            reader.fail(key, f"{name!r} is the base model's servedModelName; give the adapter its own name")
        try:
            src = parse_source(source)
        except SourceError as exc:
            reader.fail(key, str(exc))
        if src.kind == "pvc":
            reader.fail(key, f"{source!r}: adapters are filled onto the model volume, so use hf:// or s3://")
        if not src.pinned:
            reader.fail(key, src.unpinned_problem())
        if model.source is None or parse_source(model.source).kind == "pvc":
            reader.fail(key, "needs the base model's source (hf:// or s3://): adapters are filled onto the volume "
                             "next to the filled base model")
    if vllm.lora_adapters and model.workload == "statefulset":
        reader.fail(f"{key_path}.vllm.loraAdapters", "are filled by the fill Job onto a shared claim; use workload "
                                                     "deployment or leaderworkerset")
    if vllm.max_lora_rank is not None:
        if not vllm.lora_adapters:
            reader.fail(f"{key_path}.vllm.maxLoraRank", "is set without loraAdapters")
        if vllm.max_lora_rank not in VLLM_LORA_RANKS:
            reader.fail(f"{key_path}.vllm.maxLoraRank", f"{vllm.max_lora_rank} is not a rank vLLM accepts; use one of "
                                                        f"{', '.join(map(str, VLLM_LORA_RANKS))}")
    for key, value in (("toolCallParser", vllm.tool_call_parser), ("reasoningParser", vllm.reasoning_parser)):
        if value is not None and not _PARSER_NAME.match(value):
            reader.fail(f"{key_path}.vllm.{key}", f"{value!r} is not a parser name such as llama3_json or deepseek_r1")
    for i, arg in enumerate(vllm.extra_args):
        if (flag := owned_vllm_flag(arg)) is not None:
            reader.fail(f"{key_path}.vllm.extraArgs[{i}]", f"{arg!r}: --{flag} is set by the platform from "
                                                           f"{_VLLM_OWNED_FLAGS[flag]}; set that instead")


def _model_dir_problem(path: str) -> str | None:
    if not path.startswith(MODELS_MOUNT + "/") or ".." in path.split("/") or path.endswith("/"):
        return (f"{path!r} must be a directory under {MODELS_MOUNT}/ (where the model volume is mounted), "
                f"e.g. {MODELS_MOUNT}/llama-3.1-8b")
    return None


def require_pinned(cfg: StackConfig) -> bool:
    return cfg.require_pinned_sources if cfg.require_pinned_sources is not None else cfg.stack.startswith("prod")


def _validate_source(cfg: StackConfig, model: ModelConfig, key_path: str, reader: ConfigReader) -> None:
    """The model's source, where its directory is, and that the volume can be filled and restored."""
    if model.source is None:
        if model.model_path is None:
            reader.fail(f"{key_path}.modelPath", "is required without a source: the model directory under "
                                                 f"{MODELS_MOUNT}/ (e.g. /models/llama-3.1-8b), or set source: "
                                                 "hf://ORG/NAME@<commit sha> to have the platform fill the volume")
        if problem := _model_dir_problem(model.model_path):
            reader.fail(f"{key_path}.modelPath", problem)
        return
    try:
        src = parse_source(model.source)
    except SourceError as exc:
        reader.fail(f"{key_path}.source", str(exc))
    if not src.pinned and require_pinned(cfg):
        reader.fail(f"{key_path}.source", src.unpinned_problem() + f" (stack {cfg.stack!r} requires pinned sources)")
    if src.kind == "pvc":
        if model.workload == "statefulset":
            reader.fail(f"{key_path}.source", "a pvc:// source is one existing claim, but a StatefulSet gives each "
                                              "replica its own volume; use workload: deployment, or an hf:// or s3:// "
                                              "source to fill them")
        expected = f"{MODELS_MOUNT}/{src.path}"
        if model.model_path is not None and model.model_path != expected:
            reader.fail(f"{key_path}.modelPath", f"{model.model_path!r} does not match the source: {model.source} is "
                                                 f"mounted at {MODELS_MOUNT}, so the model is at {expected}; remove "
                                                 "modelPath")
        if model.storage.restore_from_snapshot:
            reader.fail(f"{key_path}.storage.restoreFromSnapshot", f"the claim {src.location!r} of a pvc:// source is "
                                                                   "not managed here; restore it yourself, or use an "
                                                                   "hf or s3 source")
    else:
        if model.model_path is not None and (problem := _model_dir_problem(model.model_path)):
            reader.fail(f"{key_path}.modelPath", problem)
        if model.workload != "statefulset" and model.storage.access_mode == "ReadOnlyMany":
            reader.fail(f"{key_path}.storage.accessMode", "ReadOnlyMany cannot be written by the fill Job; use "
                                                          "ReadWriteMany (the serving pods still mount it read-only)")
        if src.kind == "s3" and model.fill.hf_endpoint:
            reader.fail(f"{key_path}.fill.hfEndpoint", "is for hf:// sources; this model's source is s3://")
        if src.kind == "hf" and model.fill.s3_endpoint:
            reader.fail(f"{key_path}.fill.s3Endpoint", "is for s3:// sources; this model's source is hf://")
    if model.fill.image is None and model.runtime != "builtin":
        reader.fail(f"{key_path}.fill.image", f"is required for runtime {model.runtime}: the llm-platform serving "
                                              "image (it holds the downloader, python -m serving.fetch), pinned to a "
                                              "version")
    if model.fill.image is not None:
        _check_pinned_image(model.fill.image, f"{key_path}.fill.image", reader, require_digests(cfg))
    for key in ("hf_endpoint", "s3_endpoint"):
        url = getattr(model.fill, key)
        if url is not None and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d+)?(/\S*)?", url):
            reader.fail(f"{key_path}.fill.{camel(key)}", f"{url!r} is not a URL such as "
                                                         "https://minio.model-storage.svc:9000")
        if url is not None and url.startswith("http://") and cfg.stack.startswith("prod"):
            reader.fail(f"{key_path}.fill.{camel(key)}", f"{url!r} is plain HTTP, which would send the source's token "
                                                         f"or keys in clear; stack {cfg.stack!r} requires https://")
    for i, cidr in enumerate(model.fill.egress_cidrs):
        if not _CIDR.fullmatch(cidr):
            reader.fail(f"{key_path}.fill.egressCidrs[{i}]", f"{cidr!r} is not a CIDR such as 0.0.0.0/0 or 52.0.0.0/8")
    for i, ns in enumerate(model.fill.egress_namespaces):
        if not _DNS1123_LABEL.match(ns):
            reader.fail(f"{key_path}.fill.egressNamespaces[{i}]", f"{ns!r} is not a valid namespace name")


# A cron line as snapscheduler's CRD accepts it.
_CRON = re.compile(r"^(@(annually|yearly|monthly|weekly|daily|hourly))|((((\d+,)*\d+|(\d+(/|-)\d+)|\*(/\d+)?)\s?){5})$")


def _validate_backups(cfg: StackConfig, reader: ConfigReader) -> None:
    backups = cfg.backups
    if not backups.enabled:
        return
    if not _CRON.fullmatch(backups.schedule):
        reader.fail("backups.schedule", f"{backups.schedule!r} is not a cron schedule (five fields such as '0 3 * * "
                                        "*', or @daily, @weekly, ...)")
    if backups.max_age is not None and not re.fullmatch(r"\d+(h|m|s)", backups.max_age):
        reader.fail("backups.maxAge", f"{backups.max_age!r} is not a duration in hours, minutes or seconds such as "
                                      "720h")


_MANAGED_ENV = {"BLOCK_SIZE": "kvBlockSize", "ENABLE_PREFIX_CACHING": "prefixCaching",
                "MODEL_NAME": "servedModelName", "MODEL_PATH": "modelPath", "PORT": "the platform (8000)",
                "API_KEYS_FILE": "the generated API-key Secret", "MAX_NUM_SEQS": "maxNumSeqs",
                "MAX_MODEL_LEN": "maxModelLen", "DRAIN_SECONDS": "drainSeconds",
                "VLLM_API_KEY": "the generated API-key Secret (read from its mounted file)",
                "VLLM_HOST_IP": "the platform (each pod's IP, on a leaderworkerset)",
                "LWS_LEADER_ADDRESS": "the LeaderWorkerSet "
                                      "controller", "LWS_GROUP_SIZE": "the LeaderWorkerSet controller",
                "LWS_WORKER_INDEX": "the LeaderWorkerSet controller"}
