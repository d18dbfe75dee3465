"""The capacity plan: checks every model against GPU memory, quota, LimitRange and node shape at preview, computes
the values that follow from them (rollout strategy, startup probe budget, /dev/shm, engine limits, the model
directory and claim names) into a `PlannedModel` per model, and describes the result per model (`ModelPlan`) for
`render.py`, `pulumi preview` and a stack output.

It builds on the validated config types only (`llm_platform.stack` composes reading, validation and this plan).
Each failure is one ConfigError naming the stack, the key path, the numbers and the smallest fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, NoReturn

from llm_platform import capacity
from llm_platform.capacity import GIB, PRESETS, Architecture, Sizing, gib
from llm_platform.config import (
    MODELS_MOUNT,
    ModelConfig,
    ProbeConfig,
    ResourcesConfig,
    RolloutConfig,
    SizingConfig,
    StackConfig,
    StorageConfig,
    dns_name,
    fill_job_name,
    hpa_name,
    lora_adapter_paths,
    model_max_replicas,
    model_min_replicas,
    parse_image,
    require_digests,
    tls_secret_name,
)
from llm_platform.metric_contract import RUNTIMES, ContractError, ModelQueries, model_queries
from llm_platform.model_source import parse_source
from llm_platform.quantities import format_bytes_gib, parse_quantity

Fail = Callable[[str, str], NoReturn]
ARTICLE_STARTUP_FAILURES = 30


@dataclass(frozen=True)
class PlannedProbes:
    """The serving container's probes, every number set (the startup probe's failureThreshold from the plan)."""

    liveness: ProbeConfig
    readiness: ProbeConfig
    startup: ProbeConfig


@dataclass(frozen=True)
class PlannedModel:
    """One model as the plan resolved it: `config` as the stack file wrote it, and every value computed from it. The
    components and builders take this, so an unplanned model cannot reach them."""

    config: ModelConfig
    image: str
    """The serving image: `image`, else the runtime's pinned default."""
    model_path: str
    """MODEL_PATH: the revision directory the fill writes (hf, s3), the claim's path (pvc), or modelPath."""
    storage: StorageConfig
    """`storage` with the claim names resolved (an existing pvc:// claim, or the claim restored from a snapshot)."""
    rollout: RolloutConfig
    """`rollout`, else the strategy the quota leaves room for."""
    probes: PlannedProbes
    shm_size: str | None
    """/dev/shm for multi-GPU pods (`shmSize`, else 2Gi per GPU); None for one GPU."""
    max_model_len: int | None
    """MAX_MODEL_LEN: `maxModelLen`, else the sized context."""
    max_num_seqs: int | None
    """MAX_NUM_SEQS: `maxNumSeqs`, else the sized concurrency."""
    require_checksums: bool
    """`fill.requireChecksums`, else on for stacks named prod*."""

    @property
    def name(self) -> str:
        """The model's Kubernetes name (`config.name`): its workload, Service, HPA and PDB are named after it."""
        return self.config.name


@dataclass(frozen=True)
class ModelPlan:
    name: str
    gpus_per_replica: int
    min_replicas: int
    max_replicas: int
    rollout: str
    """The chosen strategy and why."""
    startup_budget_seconds: int
    load_estimate_seconds: float | None
    memory: dict | None
    """Per-GPU memory in GiB (weights, kvCache, overhead, total, usable, headroom), when sized."""
    max_sequences_at_full_context: int | None
    shm: str | None
    cost_per_hour_min: float | None
    cost_per_hour_max: float | None
    autoscaling: str
    """How the model scales and on what signal (and the cold-start cost of scaling to zero)."""
    target_load_per_replica: int
    queries: ModelQueries
    """Every PromQL query rendered for this model (not part of the stack output)."""
    model_storage: tuple[str, ...] = ()
    """Where the weights come from, how the volume is filled, backed up or restored."""
    kv_cache: dict | None = None
    """Sized models: the paged KV cache's blocks per GPU (blocks, blockSize) and the sequences they hold at full
    context and at a typical length (fullContextSequences, typicalTokens, typicalSequences)."""
    cold_start_timeout_seconds: int | None = None
    """With the gateway: how long it holds a request while the model has no ready pod."""
    verify_estimate_seconds: float | None = None
    """How long a pod's full re-hash of the revision takes before its server starts (sized models, fill.verify
    full), at storageReadMBps."""
    progress_deadline_seconds: int = 600
    """A Deployment's progressDeadlineSeconds: an image pull, the check and the startup budget fit in it."""
    gateway_max_inflight_per_pod: int | None = None
    """With the gateway: requests it sends one pod at once before holding more in its queue."""
    nodes_per_replica: int = 1
    """Pods (one per node) in a replica's group: more than 1 on a LeaderWorkerSet."""
    layout: str = ""
    """Runtime, workload and parallelism, in words."""

    @property
    def gpus_at_min(self) -> int:
        return self.min_replicas * self.gpus_per_replica

    @property
    def gpus_at_max(self) -> int:
        return self.max_replicas * self.gpus_per_replica

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.gpus_per_replica} GPU(s) per replica, {self.min_replicas}..{self.max_replicas} "
               f"replicas = {self.gpus_at_min} GPUs at min, {self.gpus_at_max} at max"]
        if self.nodes_per_replica > 1:
            out[0] += (f" ({self.nodes_per_replica} nodes per replica: {self.min_replicas * self.nodes_per_replica} "
                       f"nodes at min, {self.max_replicas * self.nodes_per_replica} at max)")
        if self.layout:
            out.append(f"  layout: {self.layout}")
        if self.memory:
            memory = self.memory
            out.append(f"  per GPU: weights {memory['weightsGiB']:.2f} + KV cache {memory['kvCacheGiB']:.2f} + "
                       f"overhead {memory['overheadGiB']:.2f} = {memory['totalGiB']:.2f} GiB of "
                       f"{memory['usableGiB']:.2f} usable (headroom {memory['headroomGiB']:.2f} GiB)")
            out.append(f"  max concurrent sequences at full context: {self.max_sequences_at_full_context}")
            if self.kv_cache:
                kv = self.kv_cache
                out.append(f"  paged KV cache: {kv['blocks']} blocks of {kv['blockSize']} tokens per GPU hold "
                           f"{kv['fullContextSequences']} sequences at full context, {kv['typicalSequences']} at a "
                           f"typical {kv['typicalTokens']} tokens (the engine runs at most maxNumSeqs at once)")
        else:
            out.append("  GPU memory not checked: add models[].sizing (a preset or the architecture numbers)")
        out.append(f"  autoscaling: {self.autoscaling}")
        if self.cold_start_timeout_seconds is not None:
            out.append(f"  gateway: at most {self.gateway_max_inflight_per_pod} request(s) in flight per pod, the rest "
                       f"queued; with no ready pod a request is held up to {self.cold_start_timeout_seconds} s, "
                       "then 503 with Retry-After")
        out.append(f"  rollout: {self.rollout}")
        estimate = f", estimated load {self.load_estimate_seconds:.0f} s" if self.load_estimate_seconds else ""
        check = (f"; before it, the pod re-hashes the revision (about {self.verify_estimate_seconds:.0f} s)"
                 if self.verify_estimate_seconds else "")
        out.append(f"  startup budget: {self.startup_budget_seconds} s{estimate}{check}")
        if self.shm:
            out.append(f"  /dev/shm: {self.shm} (memory-backed, counted in the memory limit)")
        out.extend(f"  {line}" for line in self.model_storage)
        if self.cost_per_hour_min is not None:
            out.append(f"  cost: {self.cost_per_hour_min:.2f}/h at min, {self.cost_per_hour_max:.2f}/h at max")
        return out

    def as_output(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "queries"}
        fields["model_storage"] = list(self.model_storage)
        return {k: v for k, v in fields.items() if v is not None} | {
            "gpusAtMin": self.gpus_at_min, "gpusAtMax": self.gpus_at_max}


@dataclass(frozen=True)
class PlannedStack:
    """A stack read, validated and planned: the config, and per model its planned values and its plan."""

    config: StackConfig
    models: tuple[PlannedModel, ...]
    plans: tuple[ModelPlan, ...]


def architecture(sizing: SizingConfig, key_path: str, fail: Fail) -> Architecture:
    numbers = {"parametersBillion": sizing.parameters_billion, "layers": sizing.layers,
               "kvHeads": sizing.kv_heads, "headDim": sizing.head_dim}
    if sizing.preset is not None:
        given = [k for k, v in numbers.items() if v is not None]
        if given:
            fail(f"{key_path}.sizing.{given[0]}", f"is set together with preset {sizing.preset!r}; use the preset or "
                                                  "the architecture numbers, not both")
        return PRESETS[sizing.preset]
    if sizing.parameters_billion is None or sizing.layers is None or sizing.kv_heads is None \
            or sizing.head_dim is None:
        missing = [k for k, v in numbers.items() if v is None]
        fail(f"{key_path}.sizing.{missing[0]}", f"is required without a preset (known presets: {', '.join(PRESETS)})")
    return Architecture(sizing.parameters_billion, sizing.layers, sizing.kv_heads, sizing.head_dim,
                        sizing.attention_heads)


def _sizing(model: ModelConfig, key_path: str, fail: Fail) -> Sizing | None:
    if model.sizing is None:
        return None
    arch = architecture(model.sizing, key_path, fail)
    context, sequences = model.sizing.max_context_tokens, model.sizing.max_concurrent_sequences
    for key, value in (("maxContextTokens", context), ("maxConcurrentSequences", sequences)):
        if value is None:
            fail(f"{key_path}.sizing.{key}", "is required: the KV cache, and so whether the model fits, depends on it")
    assert context is not None and sequences is not None  # fail() above raised otherwise
    if arch.max_context_tokens and context > arch.max_context_tokens:
        fail(f"{key_path}.sizing.maxContextTokens", f"{context} is above the model's own "
                                                    f"context window {arch.max_context_tokens}")
    for key, value, sized in (("maxModelLen", model.max_model_len, context),
                              ("maxNumSeqs", model.max_num_seqs, sequences)):
        if value is not None and value > sized:
            fail(f"{key_path}.{key}", f"{value} is above what the capacity check sized ({sized}); leave it unset to "
                                      "use the sizing value, or raise the sizing")
    kv = (model.vllm.kv_cache_dtype or "auto") if model.runtime == "vllm" else "auto"
    return Sizing(arch, model.sizing.dtype, context, sequences, kv)


def describe_layout(model: ModelConfig) -> str:
    if model.gpus_per_replica == 0:
        return f"{model.runtime} runtime on CPU, one pod per replica ({model.workload})"
    if model.runtime == "builtin":
        return f"builtin engine on one GPU per replica ({model.workload})"
    if model.workload == "leaderworkerset":
        return (f"vLLM across {model.nodes_per_replica} nodes per replica (LeaderWorkerSet group of "
                f"{model.nodes_per_replica} pods: tensor parallel {model.gpus_per_pod} inside each node x pipeline "
                f"parallel {model.nodes_per_replica} across nodes); the leader serves the API, workers join it")
    return f"vLLM, tensor parallel {model.gpus_per_replica} inside one node ({model.workload})"


def _layout_fix(cfg: StackConfig, model: ModelConfig, sizing: Sizing, usable: float) -> str:
    """The smallest layout that fits, as config to set (the builtin engine is bound to one GPU)."""
    per_node = cfg.gpu_pool.gpus_per_node
    found = capacity.smallest_layout_that_fits(sizing, usable, per_node)
    if found is None:
        limit = f"{capacity.MAX_NODES_PER_REPLICA} nodes of {per_node}" if per_node else f"{8} GPUs in one node"
        return f"no layout up to {limit} GPUs fits: use a larger GPU or a smaller dtype"
    tp, nodes = found
    if nodes == 1:
        if model.runtime == "builtin":
            return (f"runtime: vllm with gpusPerReplica {tp} (tensor parallel; the builtin engine uses one GPU)"
                    if tp > 1 else "gpusPerReplica 1")
        return f"gpusPerReplica {tp}"
    return (f"gpusPerReplica {tp * nodes} on {nodes} nodes of {tp} GPUs (runtime: vllm, workload: leaderworkerset: "
            f"tensor parallel {tp} x pipeline parallel {nodes})")


def check_gpu_memory(cfg: StackConfig, model: ModelConfig, sizing: Sizing, key_path: str, fail: Fail) -> dict:
    total = model.gpus_per_replica
    tp = model.gpus_per_pod
    if tp == 0:
        fail(f"{key_path}.gpusPerReplica", "0 with a sizing block: GPU memory is checked per GPU; set gpusPerReplica "
                                           "to 1 or more, or remove sizing for a CPU-only model")
    if sizing.arch.attention_heads and sizing.arch.attention_heads % tp:
        options = capacity.valid_tp_sizes(sizing.arch, 16)
        fail(f"{key_path}.gpusPerReplica", f"{tp} does not divide the model's {sizing.arch.attention_heads} attention "
                                           f"heads, so tensor parallelism cannot split it; use one of {options}")
    pool = cfg.gpu_pool
    usable = capacity.usable_bytes(pool.gpu_memory_gib, model.gpu_memory_utilization)
    # Tensor parallel splits weights and KV cache over a node's GPUs, pipeline parallel splits the layers over the
    # nodes: each of the replica's GPUs holds 1/total of both.
    need = capacity.per_gpu_bytes(sizing, total)
    weights, kv, overhead = capacity.weight_bytes(sizing) / total, capacity.kv_cache_bytes(sizing) / total, \
        capacity.overhead_bytes(sizing, total)
    if need > usable:
        fixes = []
        seqs = capacity.max_sequences_that_fit(sizing, total, usable)
        ctx = capacity.max_context_that_fits(sizing, total, usable)
        if seqs:
            fixes.append(f"maxConcurrentSequences <= {seqs} (at maxContextTokens {sizing.max_context_tokens})")
        if ctx:
            fixes.append(f"maxContextTokens <= {ctx} (at maxConcurrentSequences {sizing.max_concurrent_sequences})")
        fixes.append(_layout_fix(cfg, model, sizing, usable))
        fail(f"{key_path}.sizing",
             f"needs {gib(need)} per GPU at gpusPerReplica {total} (weights {gib(weights)} + KV cache {gib(kv)} + "
             f"overhead {gib(overhead)}) but {gib(usable)} is usable ({pool.gpu_memory_gib} GiB x "
             f"{model.gpu_memory_utilization}); fits with " + ", or ".join(fixes))
    return {"weightsGiB": weights / GIB, "kvCacheGiB": kv / GIB, "overheadGiB": overhead / GIB,
            "totalGiB": need / GIB, "usableGiB": usable / GIB, "headroomGiB": (usable - need) / GIB}


def startup_threshold(model: ModelConfig, sizing: Sizing | None, key_path: str, fail: Fail) -> tuple[int, float | None]:
    probe = model.probes.startup
    estimate = capacity.load_seconds(sizing, model.storage_read_mbps) if sizing else None
    computed = capacity.startup_failure_threshold(estimate, probe.period_seconds, ARTICLE_STARTUP_FAILURES) \
        if estimate else ARTICLE_STARTUP_FAILURES
    if probe.failure_threshold is None:
        return computed, estimate
    if estimate is not None and sizing is not None:
        budget = probe.failure_threshold * probe.period_seconds + probe.initial_delay_seconds
        needed = estimate * capacity.STARTUP_SAFETY
        if budget < needed:
            fail(f"{key_path}.probes.startup.failureThreshold",
                 f"{probe.failure_threshold} x {probe.period_seconds} s = {budget} s is shorter than the estimated "
                 f"{estimate:.0f} s to load {gib(capacity.weight_bytes(sizing))} at {model.storage_read_mbps:g} MB/s "
                 f"plus {capacity.WARMUP_SECONDS} s warm-up (x{capacity.STARTUP_SAFETY} margin = {needed:.0f} s), so "
                 f"the kubelet would kill pods still loading; use at least {math.ceil(needed / probe.period_seconds)} "
                 "or leave it unset")
    return probe.failure_threshold, estimate


def check_shm(model: ModelConfig, key_path: str, fail: Fail) -> str | None:
    if model.gpus_per_pod <= 1 and model.nodes_per_replica == 1:
        return None
    shm = model.shm_size or f"{max(1, capacity.shm_bytes(model.gpus_per_pod) // GIB)}Gi"
    shm_bytes, limit, request = parse_quantity(shm), parse_quantity(model.resources.limits.memory), \
        parse_quantity(model.resources.requests.memory)
    if shm_bytes + request > limit:
        fail(f"{key_path}.resources.limits.memory",
             f"{model.resources.limits.memory} cannot hold the {shm} /dev/shm of a {model.gpus_per_pod}-GPU pod "
             f"(memory-backed, it counts against the limit) plus the {model.resources.requests.memory} memory request; "
             f"raise it to at least {format_bytes_gib(shm_bytes + request)} or lower shmSize")
    return shm


def check_limits(cfg: StackConfig, model: ModelConfig, key_path: str, fail: Fail) -> None:
    check_limit_range(cfg, model.resources, key_path, fail)
    shape = cfg.gpu_pool.node_shape
    if shape is not None and model.gpus_per_replica:
        for key, value, node in (("cpu", model.resources.requests.cpu, shape.cpu),
                                 ("memory", model.resources.requests.memory, shape.memory)):
            if parse_quantity(value) > parse_quantity(node):
                fail(f"{key_path}.resources.requests.{key}", f"{value} is more than one GPU node has "
                                                             f"(gpuPool.nodeShape.{key} {node}); the pod can never "
                                                             "schedule")


def check_limit_range(cfg: StackConfig, resources: ResourcesConfig, key_path: str, fail: Fail) -> None:
    lr = cfg.guardrails.limit_range
    for key, value, cap, cap_key in (("cpu", resources.limits.cpu, lr.max_cpu, "maxCpu"),
                                     ("memory", resources.limits.memory, lr.max_memory, "maxMemory")):
        if lr.enabled and cap is not None and parse_quantity(value) > parse_quantity(cap):
            fail(f"{key_path}.resources.limits.{key}", f"{value} is above guardrails.limitRange.{cap_key} {cap}; the "
                                                       "LimitRange would reject every pod; lower the limit or raise "
                                                       "the maximum")


@dataclass
class _Budget:
    """What the quota has left once every model is at maxReplicas, to spend on rollout surges."""

    gpus: Decimal
    amounts: dict[str, Decimal]

    def fits(self, model: ModelConfig, pods: int) -> bool:
        if pods * model.gpus_per_replica > self.gpus:
            return False
        return all(pods * need <= self.amounts[k] for k, need in _pod_amounts(model).items())

    def take(self, model: ModelConfig, pods: int) -> None:
        self.gpus -= pods * model.gpus_per_replica
        for k, need in _pod_amounts(model).items():
            self.amounts[k] -= pods * need


def _pod_amounts(model: ModelConfig) -> dict[str, Decimal]:
    """What one replica requests: one pod, or every pod of a LeaderWorkerSet group."""
    return {k: model.nodes_per_replica * v for k, v in _amounts(model.resources).items()}


def _amounts(resources: ResourcesConfig) -> dict[str, Decimal]:
    """What one pod requests."""
    return {"requests.cpu": parse_quantity(resources.requests.cpu),
            "requests.memory": parse_quantity(resources.requests.memory),
            "limits.cpu": parse_quantity(resources.limits.cpu),
            "limits.memory": parse_quantity(resources.limits.memory)}


def _gateway_amounts(cfg: StackConfig) -> dict[str, Decimal]:
    """The gateway's pods at its maxReplicas, plus the one its rolling update surges (they share the quota)."""
    gw = cfg.gateway
    if not gw.enabled:
        return {}
    return {k: v * (gw.autoscaling.max_replicas + 1) for k, v in _amounts(gw.resources).items()}


def check_quota(cfg: StackConfig, fail: Fail) -> _Budget | None:
    resource_quota = cfg.guardrails.resource_quota
    if not resource_quota.enabled:
        return None
    needed = cfg.total_gpus_at_max
    if needed > resource_quota.gpus:
        detail = ", ".join(f"{model.name}: {model_max_replicas(model)} x "
                           f"{model.gpus_per_replica}" for model in cfg.models)
        fail("guardrails.resourceQuota.gpus",
             f"{resource_quota.gpus} GPUs cannot hold the models at maxReplicas ({detail} = {needed} GPUs); "
             f"raise the quota to {needed} or lower maxReplicas")
    quotas = {"requests.cpu": resource_quota.requests_cpu, "requests.memory": resource_quota.requests_memory,
              "limits.cpu": resource_quota.limits_cpu, "limits.memory": resource_quota.limits_memory}
    left = {}
    gateway = _gateway_amounts(cfg)
    for kind, quota in quotas.items():
        total = sum(_pod_amounts(model)[kind] * model_max_replicas(model) for model in cfg.models) \
            + gateway.get(kind, 0)
        if total > parse_quantity(quota):
            key = "".join(w.capitalize() if i else w for i, w in enumerate(kind.split(".")))
            shown = format_bytes_gib(Decimal(total)) if "memory" in kind else f"{Decimal(total).normalize():f}"
            with_gateway = " and the gateway at its maxReplicas (plus one surge pod)" if gateway else ""
            fail(f"guardrails.resourceQuota.{key}",
                 f"{quota} is below what the models need at maxReplicas{with_gateway} ({kind} {shown}); "
                 "raise the quota or lower maxReplicas or the per-replica resources")
        left[kind] = parse_quantity(quota) - total
    claims = sum(_claims_per_model(model) for model in cfg.models)
    if claims > resource_quota.persistent_volume_claims:
        fail("guardrails.resourceQuota.persistentVolumeClaims",
             f"{resource_quota.persistent_volume_claims} is below the {claims} model volumes the models need at "
             "maxReplicas (one per Deployment, one per StatefulSet replica); raise it")
    for cls, cap in sorted(resource_quota.storage_by_class.items()):
        used = sum(parse_quantity(model.storage.size) * _claims_per_model(model)
                   for model in cfg.models if model.storage.storage_class == cls)
        if used > parse_quantity(cap):
            fail(f"guardrails.resourceQuota.storageByClass.{cls}",
                 f"{cap} is below the {format_bytes_gib(Decimal(used))} of {cls} model volumes at maxReplicas; raise "
                 "it or shrink models[].storage.size")
    return _Budget(Decimal(resource_quota.gpus - needed), left)


def _claims_per_model(model: ModelConfig) -> int:
    """Model volumes the platform creates: one per Deployment (none for an existing pvc:// claim), one per
    StatefulSet replica."""
    if model.workload == "statefulset":
        return model_max_replicas(model)
    return 0 if model.source and parse_source(model.source).kind == "pvc" else 1


def plan_storage(cfg: StackConfig, model: ModelConfig) -> tuple[str | None, StorageConfig, tuple[str, ...]]:
    """The model directory, the claim names (an existing claim, or one restored from a snapshot) and the plan's
    description of how the volume is filled and backed up."""
    storage, lines = model.storage, []
    if model.source is None:
        lines.append(f"model: {model.model_path} on the volume, filled by other means (set source to have the "
                     "platform fill it from a pinned revision)")
        model_path = model.model_path
    else:
        src = parse_source(model.source)
        pin = "pinned" if src.pinned else "NOT pinned: the revision can move, replicas filled later may differ"
        if src.kind == "pvc":
            model_path = f"{MODELS_MOUNT}/{src.path}"
            storage = dataclasses.replace(storage, claim_name=src.location)
            lines.append(f"model: {model.source}: existing claim {src.location!r} mounted read-only, {model_path}; "
                         "pods check it holds a complete model before serving")
        else:
            model_path = f"{model.model_path or f'{MODELS_MOUNT}/{model.name}'}/{src.directory}"
            how = (f"Job {fill_job_name(model, src.short_id)} fills the volume before the pods roll"
                   + ("; every pod of a group checks the same revision before it starts"
                      if model.workload == "leaderworkerset" else "")
                   if model.workload != "statefulset" else
                   f"the {model_max_replicas(model)} replica volumes are created ahead of the pods, each filled by its "
                   f"own Job ({fill_job_name(model, src.short_id)}-<ordinal>, beside its replica) before the pods roll")
            lines.append(f"model: {model.source} ({pin}) -> {model_path}; {how}; pods serve offline after checking "
                         f"the fill's manifest; {model.fill.keep_revisions} revision(s) kept on the volume")
            for adapter, path in lora_adapter_paths(model, model_path).items():
                lines.append(f"LoRA adapter {adapter}: {model.vllm.lora_adapters[adapter]} -> {path}, filled by the "
                             "same Job")
    if storage.restore_from_snapshot:
        snap = storage.restore_from_snapshot
        storage = dataclasses.replace(storage, claim_name=dns_name(storage.claim_name, "from", snap),
                                      template_name=dns_name(storage.template_name, "from", snap))
        name = storage.claim_name if model.workload != "statefulset" else f"{storage.template_name}-<pod>"
        lines.append(f"restore: volume {name} is created from VolumeSnapshot {snap!r}; the pods roll onto it and "
                     "the previous volume is deleted after them")
    if cfg.backups.enabled and not (model.source and parse_source(model.source).kind == "pvc"):
        backups = cfg.backups
        age = f", and none older than {backups.max_age}" if backups.max_age else ""
        lines.append(f"backups: snapshots '{backups.schedule}' with class {backups.snapshot_class.name}, keeping the "
                     f"newest {backups.retention}{age} (needs the snapscheduler operator)")
    return model_path, storage, tuple(lines)


def choose_rollout(model: ModelConfig, key_path: str, budget: _Budget | None, fail: Fail) -> tuple[RolloutConfig, str]:
    if model.workload == "statefulset":
        return RolloutConfig(0, 1), "StatefulSet replaces one pod at a time (maxUnavailable 1); no surge GPU needed"
    if model.rollout is not None:
        surge = model.rollout.max_surge
        if budget is not None and surge and not budget.fits(model, surge):
            fail(f"{key_path}.rollout.maxSurge",
                 f"{surge} needs {surge * model.gpus_per_replica} spare GPU(s) and room for {surge} more pod(s) at "
                 f"maxReplicas, but the quota leaves {budget.gpus} GPU(s) spare, so the rollout would wait forever; "
                 "use maxSurge 0 / maxUnavailable 1, or raise guardrails.resourceQuota")
        if budget is not None and surge:
            budget.take(model, surge)
        return model.rollout, f"maxSurge {surge} / maxUnavailable {model.rollout.max_unavailable} (from config)"
    if budget is None or budget.fits(model, 1):
        if budget is not None:
            budget.take(model, 1)
        return RolloutConfig(1, 0), "maxSurge 1 / maxUnavailable 0: zero downtime, the quota has room for one " \
                                    "extra replica at maxReplicas"
    return RolloutConfig(0, 1), ("maxSurge 0 / maxUnavailable 1: the quota has no room for an extra replica at "
                                 "maxReplicas, so each update takes one replica down first (capacity dips by one)")


def describe_autoscaling(model: ModelConfig, target: int, estimate: float | None, weights: str | None,
                         cold_start_timeout: int | None) -> str:
    autoscaling = model.autoscaling
    if not autoscaling.enabled:
        return f"off: {model.replicas} replica(s)"
    signal = f"running + waiting requests per replica, target {target}"
    if autoscaling.mode == "keda" and cold_start_timeout is not None:
        signal = f"running + waiting requests per replica plus those the gateway holds, target {target}"
    if autoscaling.mode == "hpa":
        return (f"HPA {autoscaling.min_replicas}..{autoscaling.max_replicas} on {signal} (Pods metric from "
                f"prometheus-adapter), CPU {autoscaling.target_cpu_utilization}% and memory "
                f"{autoscaling.target_memory_utilization}% as secondary metrics")
    text = f"KEDA {autoscaling.min_replicas}..{autoscaling.max_replicas} on {signal}"
    if autoscaling.min_replicas == 0:
        load = (f"load {weights} of weights (about {estimate:.0f} s estimated) and warm up" if estimate
                else "load its weights and warm up")
        # Only reachable with the gateway (validation refuses minReplicas 0 without it).
        text += (f"; scales to zero after {autoscaling.cooldown_seconds} s without load and wakes above "
                 f"{autoscaling.activation_load}: the gateway holds the first request after that up to "
                 f"{cold_start_timeout} s while a pod is scheduled, {load}, then 503 with Retry-After")
    return text


DEFAULT_PROGRESS_DEADLINE = 600
IMAGE_PULL_SECONDS = 300
"""Allowed for pulling a multi-GB serving image onto a new node, in the Deployment's progress deadline."""


def plan_kv_blocks(cfg: StackConfig, model: ModelConfig, sizing: Sizing) -> dict:
    """The paged KV cache in blocks: how many the memory left after weights holds, and so how many sequences fit at
    full context and at a typical length (short requests take few blocks, so many more fit)."""
    usable = capacity.usable_bytes(cfg.gpu_pool.gpu_memory_gib, model.gpu_memory_utilization)
    block_size = model.kv_block_size
    blocks = capacity.kv_blocks(sizing, model.gpus_per_replica, usable, block_size)
    typical = (model.sizing.typical_context_tokens if model.sizing and model.sizing.typical_context_tokens
               else max(1, sizing.max_context_tokens // 4))
    return {"blocks": blocks, "blockSize": block_size,
            "fullContextSequences": capacity.sequences_in_blocks(blocks, sizing.max_context_tokens, block_size),
            "typicalTokens": typical,
            "typicalSequences": capacity.sequences_in_blocks(blocks, typical, block_size)}


def verify_seconds(model: ModelConfig, sizing: Sizing | None) -> float | None:
    """A full check reads every weight byte once before the server starts; size-only reads none."""
    if model.source is None or model.fill.verify != "full" or sizing is None:
        return None
    return capacity.weight_bytes(sizing) / (model.storage_read_mbps * 1e6)


def gateway_limits(cfg: StackConfig, model: ModelConfig, key_path: str, budget_seconds: int, estimate: float | None,
                   num_seqs: int | None, fail: Fail) -> tuple[int | None, int | None]:
    """The gateway's cold-start hold and per-pod in-flight bound for one model (None, None without a gateway)."""
    gw = cfg.gateway
    if not gw.enabled:
        return None, None
    timeout = gw.cold_start_timeout_seconds or budget_seconds
    scales_to_zero = model.autoscaling.enabled and model.autoscaling.min_replicas == 0
    if gw.cold_start_timeout_seconds and estimate and scales_to_zero and gw.cold_start_timeout_seconds < estimate:
        fail("gateway.coldStartTimeoutSeconds",
             f"{gw.cold_start_timeout_seconds} is shorter than the estimated {estimate:.0f} s {key_path} "
             f"({model.name}) needs to load its weights and warm up, so every request that wakes it from zero would "
             f"get 503; raise it to at least {math.ceil(estimate)} or leave it unset (the startup budget, "
             f"{budget_seconds} s)")
    inflight = gw.max_inflight_per_pod or 2 * (num_seqs or RUNTIMES[model.runtime].default_max_num_seqs)
    return timeout, inflight


def plan_stack(cfg: StackConfig, fail: Fail) -> PlannedStack:
    """Run every capacity check; return the stack with each model's computed values and plan."""
    if cfg.gateway.enabled:
        check_limit_range(cfg, cfg.gateway.resources, "gateway", fail)
    budget = check_quota(cfg, fail)
    models, plans = [], []
    for i, model in enumerate(cfg.models):
        key_path = f"models[{i}]"
        sizing = _sizing(model, key_path, fail)
        memory = check_gpu_memory(cfg, model, sizing, key_path, fail) if sizing else None
        threshold, estimate = startup_threshold(model, sizing, key_path, fail)
        shm = check_shm(model, key_path, fail)
        check_limits(cfg, model, key_path, fail)
        rollout, why = choose_rollout(model, key_path, budget, fail)
        rt = RUNTIMES[model.runtime]
        num_seqs = model.max_num_seqs or (sizing.max_concurrent_sequences if sizing else None)
        target = model.autoscaling.target_load_per_replica or num_seqs or \
            (rt.default_max_num_seqs if model.gpus_per_replica else 8)
        try:
            queries = model_queries(
                rt, namespace=cfg.namespace, workload=model.name, served_model_name=model.served_model_name,
                hpa_name=hpa_name(model), min_replicas=model_min_replicas(model),
                certificate=tls_secret_name(cfg, model),
                dcgm=cfg.addons.dcgm_exporter.enabled, gateway=cfg.gateway.enabled)
        except ContractError as exc:
            fail(f"{key_path}.runtime", f"{model.runtime!r}: {exc}; the alerts, dashboard and autoscaler need it")
        if model.image is None and rt.default_image and require_digests(cfg) \
                and parse_image(rt.default_image)[2] is None:
            fail(f"{key_path}.image", f"is unset, so the {model.runtime} runtime's default {rt.default_image} would "
                                      "run, pinned by tag only, and this stack requires digests (stacks named prod*, "
                                      f"or requireDigests); set image to {rt.default_image}@sha256:<the digest your "
                                      "registry reports>")
        model_path, storage, storage_lines = plan_storage(cfg, model)
        image = model.image or rt.default_image
        if image is None or model_path is None:  # validation requires both (image: builtin; modelPath: no source)
            fail(f"{key_path}.image" if image is None else f"{key_path}.modelPath", "is required")
        startup = model.probes.startup
        models.append(PlannedModel(
            config=model, image=image, model_path=model_path, storage=storage, rollout=rollout,
            probes=PlannedProbes(
                liveness=model.probes.liveness, readiness=model.probes.readiness,
                startup=ProbeConfig(startup.initial_delay_seconds, startup.period_seconds, startup.timeout_seconds,
                                    threshold)),
            shm_size=shm,
            max_model_len=model.max_model_len or (sizing.max_context_tokens if sizing else None),
            max_num_seqs=num_seqs,
            require_checksums=(model.fill.require_checksums if model.fill.require_checksums is not None
                               else cfg.stack.startswith("prod"))))
        price = cfg.gpu_pool.hourly_cost_per_gpu
        lo, hi = model_min_replicas(model), model_max_replicas(model)
        budget_seconds = threshold * model.probes.startup.period_seconds + model.probes.startup.initial_delay_seconds
        check = verify_seconds(model, sizing)
        cold_start, inflight = gateway_limits(cfg, model, key_path, budget_seconds + math.ceil(check or 0), estimate,
                                              num_seqs, fail)
        plans.append(ModelPlan(
            name=model.name, gpus_per_replica=model.gpus_per_replica, min_replicas=lo, max_replicas=hi, rollout=why,
            startup_budget_seconds=budget_seconds,
            load_estimate_seconds=estimate, memory=memory,
            max_sequences_at_full_context=(capacity.max_sequences_that_fit(
                sizing, model.gpus_per_replica,
                capacity.usable_bytes(cfg.gpu_pool.gpu_memory_gib, model.gpu_memory_utilization))
                if sizing else None),
            kv_cache=plan_kv_blocks(cfg, model, sizing) if sizing else None,
            shm=shm,
            cost_per_hour_min=None if price is None else lo * model.gpus_per_replica * price,
            cost_per_hour_max=None if price is None else hi * model.gpus_per_replica * price,
            autoscaling=describe_autoscaling(model, target, estimate,
                                             gib(capacity.weight_bytes(sizing)) if sizing else None, cold_start),
            target_load_per_replica=target, model_storage=storage_lines, queries=queries,
            cold_start_timeout_seconds=cold_start, gateway_max_inflight_per_pod=inflight,
            verify_estimate_seconds=check,
            progress_deadline_seconds=max(DEFAULT_PROGRESS_DEADLINE, math.ceil(budget_seconds + (check or 0)
                                                                               + IMAGE_PULL_SECONDS)),
            nodes_per_replica=model.nodes_per_replica, layout=describe_layout(model) + (
                "; needs the LeaderWorkerSet controller in the cluster (addons.leaderWorkerSet.enabled installs it)"
                if model.workload == "leaderworkerset" and not cfg.addons.leader_worker_set.enabled else "")))
    return PlannedStack(config=cfg, models=tuple(models), plans=tuple(plans))
