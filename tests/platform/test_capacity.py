"""Capacity planning: arithmetic against hand-computed numbers, and each check fed the bad case.

Hand computation (bytes), Llama 3.1 8B, bfloat16, 8192 tokens x 32 sequences, one 80 GiB GPU at 0.9:
  weights   8.03e9 x 2                                  = 16,060,000,000
  KV/token  2 x 32 layers x 8 kv heads x 128 x 2 bytes  = 131,072
  KV cache  131,072 x 8192 x 32                         = 34,359,738,368  (32 GiB)
  overhead  2 GiB + 5% of 16.06e9                       = 2,950,483,648
  total                                                 = 53,370,222,016  <= usable 77,309,411,328
  sequences that fit at 8192 tokens: (77,309,411,328 - 16,060,000,000 - 2,950,483,648) / (131,072 x 8192) = 54.3
Llama 3.1 70B, same serving limits: KV/token 2 x 80 x 8 x 128 x 2 = 327,680; per GPU at TP 1 / 2 / 4:
  236,306,829,568 / 119,227,156,608 / 60,687,320,128 -> the smallest tensor-parallel size that fits is 4.
"""
from __future__ import annotations

import pytest

from llm_platform import capacity
from llm_platform.capacity import PRESETS, Sizing
from llm_platform.config import ConfigError
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values

GIB = 2**30
USABLE_80 = capacity.usable_bytes(80, 0.9)


def sizing(preset, ctx=8192, seqs=32, dtype="bfloat16"):
    return Sizing(PRESETS[preset], dtype, ctx, seqs)


def test_llama_31_8b_numbers():
    s = sizing("llama-3.1-8b")
    assert capacity.weight_bytes(s) == 16_060_000_000
    assert capacity.kv_bytes_per_token(s) == 131_072
    assert capacity.kv_cache_bytes(s) == 34_359_738_368
    assert capacity.overhead_bytes(s, 1) == 2_950_483_648
    assert capacity.per_gpu_bytes(s, 1) == 53_370_222_016
    assert USABLE_80 == 77_309_411_328
    assert capacity.max_sequences_that_fit(s, 1, USABLE_80) == 54
    assert capacity.max_context_that_fits(s, 1, USABLE_80) == 13_899
    assert capacity.load_seconds(s, 250) == pytest.approx(124.24)


def test_llama_31_70b_needs_four_gpus():
    s = sizing("llama-3.1-70b")
    assert capacity.kv_bytes_per_token(s) == 327_680
    assert [capacity.per_gpu_bytes(s, tp) for tp in (1, 2, 4)] == \
        [236_306_829_568, 119_227_156_608, 60_687_320_128]
    assert capacity.smallest_tp_that_fits(s, USABLE_80, 8) == 4


def test_qwen_grouped_query_attention_and_dtypes():
    s = sizing("qwen2.5-7b")
    assert capacity.kv_bytes_per_token(s) == 57_344   # 2 x 28 x 4 kv heads x 128 x 2
    assert capacity.kv_bytes_per_token(sizing("qwen2.5-7b", dtype="float8")) == 28_672
    # int4 quantizes weights only: a quarter of the weight bytes, the same 16-bit KV cache.
    assert capacity.weight_bytes(sizing("qwen2.5-7b", dtype="int4")) == pytest.approx(7.62e9 * 0.5)
    assert capacity.kv_bytes_per_token(sizing("qwen2.5-7b", dtype="int4")) == 57_344
    assert capacity.valid_tp_sizes(PRESETS["qwen2.5-7b"], 8) == [1, 2, 4]   # 28 heads: 8 does not divide


def test_startup_threshold_and_shm():
    assert capacity.startup_failure_threshold(124.24, 10, 30) == 30      # ceil(186.4 / 10) = 19 < 30
    assert capacity.startup_failure_threshold(600, 10, 30) == 90         # 600 x 1.5 / 10
    assert capacity.shm_bytes(1) == 0
    assert capacity.shm_bytes(4) == 8 * GIB and capacity.shm_bytes(8) == 16 * GIB and capacity.shm_bytes(16) == 16 * GIB


# ------------------------------------------------------------------------------------------ bad configs


def prod(**model_changes):
    values = stack_values("prod")
    values["models"][0].update(model_changes)
    return values


def with_sizing(**changes):
    values = stack_values("prod")
    values["models"][0]["sizing"].update(changes)
    return values


def seventy_b(**extra):
    return prod(sizing={"preset": "llama-3.1-70b", "maxContextTokens": 8192, "maxConcurrentSequences": 32}, **extra)


VLLM = {"runtime": "vllm", "image": "vllm/vllm-openai:v0.30.0@sha256:5e4c9e21916e060cad31033c82914c1bee10e6fdba3250a7e680495a0619a47d",
        "fill": {"secretName": "hf-token", "image": "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"}}
"""The vLLM runtime, which splits a model across GPUs (prod's hf source needs the fill image for it)."""


def guardrails(values, section, **changes):
    values["guardrails"].setdefault(section, {}).update(changes)
    return values


BAD = {
    "70b on one "
    "GPU": (seventy_b(), "models[0].sizing: needs 220.08 GiB per GPU at gpusPerReplica 1 (weights 131.50 GiB "
                       "+ KV cache 80.00 GiB + overhead 8.58 GiB) but 72.00 GiB is usable (80 GiB x 0.9); fits with "
                       "runtime: vllm with gpusPerReplica 4 (tensor parallel; the builtin engine uses one GPU)"),
    "70b on one GPU, vllm": (seventy_b(**VLLM), "is usable (80 GiB x 0.9); fits with gpusPerReplica 4"),
    "8b full 128k context": (with_sizing(maxContextTokens=131072),
                             "models[0].sizing: needs 529.70 GiB per GPU at gpusPerReplica 1 (weights 14.96 GiB + KV "
                             "cache 512.00 GiB + overhead 2.75 GiB) but 72.00 GiB is usable (80 GiB x 0.9); fits with "
                             "maxConcurrentSequences <= 3 (at maxContextTokens 131072), or maxContextTokens <= 13899 "
                             "(at maxConcurrentSequences 32), or runtime: vllm with gpusPerReplica 8 (tensor parallel; "
                             "the builtin engine uses one GPU)"),
    "too little utilization": (prod(gpuMemoryUtilization=0.5),
                               "models[0].sizing: needs 49.70 GiB per GPU at gpusPerReplica 1 (weights 14.96 GiB + KV "
                               "cache 32.00 GiB + overhead 2.75 GiB) but 40.00 GiB is usable (80 GiB x 0.5); fits with "
                               "maxConcurrentSequences <= 22"),
    "nothing fits": (guardrails(seventy_b(), "resourceQuota", gpus=10) | {"gpuPool": {**stack_values("prod")["gpuPool"],
                                                                                      "gpuMemoryGiB": 24,
                                                                                      "gpusPerNode": 2}},
                     "fits with gpusPerReplica 12 on 6 nodes of 2 GPUs (runtime: vllm, workload: leaderworkerset: "
                     "tensor parallel 2 x pipeline parallel 6)"),
    "nothing fits on 8 nodes": (
        guardrails(prod(sizing={"preset": "llama-3.1-405b", "maxContextTokens": 8192, "maxConcurrentSequences": 32}),
                   "resourceQuota", gpus=10) | {"gpuPool": {**stack_values("prod")["gpuPool"], "gpuMemoryGiB": 24,
                                                            "gpusPerNode": 2}},
        "fits with no layout up to 8 nodes of 2 GPUs fits: use a larger GPU or a smaller dtype"),
    "preset and numbers": (with_sizing(layers=32),
                           "models[0].sizing.layers: is set together with preset 'llama-3.1-8b'; use the preset or "
                           "the architecture numbers, not both"),
    "no preset, no "
    "layers": (prod(sizing={"parametersBillion": 8, "kvHeads": 8, "headDim": 128, "maxContextTokens": 8192,
                                          "maxConcurrentSequences": 8}),
                             "models[0].sizing.layers: is required without a preset (known presets: llama-3.1-8b"),
    "unknown preset": (with_sizing(preset="llama-9b"), "models[0].sizing.preset: 'llama-9b' is not allowed; use one of "
                                                       "'llama-3.1-8b', 'llama-3.1-70b'"),
    "no context": (prod(sizing={"preset": "llama-3.1-8b", "maxConcurrentSequences": 32}),
                   "models[0].sizing.maxContextTokens: is required: the KV cache, and so whether the model fits, "
                   "depends on it"),
    "context over the model's": (prod(sizing={"preset": "qwen2.5-7b", "maxContextTokens": 65536,
                                              "maxConcurrentSequences": 1}),
                                 "models[0].sizing.maxContextTokens: 65536 is above the model's own context window "
                                 "32768"),
    "tp does not divide heads": (guardrails(prod(gpusPerReplica=3, **VLLM), "resourceQuota", gpus=30),
                                 "models[0].gpusPerReplica: 3 does not divide the model's 32 attention heads, so "
                                 "tensor parallelism cannot split it; use one of [1, 2, 4, 8, 16]"),
    "sized cpu model": (guardrails(prod(gpusPerReplica=0), "resourceQuota", gpus=0),
                        "models[0].gpusPerReplica: 0 with a sizing block: GPU memory is checked per GPU"),
    "startup too short": (prod(probes={"startup": {"failureThreshold": 10}}),
                          "models[0].probes.startup.failureThreshold: 10 x 10 s = 100 s is shorter than the estimated "
                          "124 s to load 14.96 GiB at 250 MB/s plus 60 s warm-up (x1.5 margin = 186 s), so the kubelet "
                          "would kill pods still loading; use at least 19 or leave it unset"),
    "slow storage": (prod(storageReadMBps=20, probes={"startup": {"failureThreshold": 30}}),
                     "models[0].probes.startup.failureThreshold: 30 x 10 s = 300 s is shorter than the estimated 863 s "
                     "to load 14.96 GiB at 20 MB/s"),
    "shm over the memory limit": (guardrails(prod(gpusPerReplica=2, resources={"limits": {"memory": "10Gi"}}, **VLLM),
                                             "resourceQuota", gpus=20),
                                  "models[0].resources.limits.memory: 10Gi cannot hold the 4Gi /dev/shm of a 2-GPU "
                                  "pod (memory-backed, it counts against the limit) plus the 8Gi memory request; "
                                  "raise it to at least 12 GiB or lower shmSize"),
    "limit above LimitRange max cpu": (guardrails(prod(), "limitRange", maxCpu="4"),
                                       "models[0].resources.limits.cpu: 8 is above guardrails.limitRange.maxCpu 4; the "
                                       "LimitRange would reject every pod"),
    "limit above LimitRange max memory": (guardrails(prod(), "limitRange", maxMemory="12Gi"),
                                          "models[0].resources.limits.memory: 16Gi is above "
                                          "guardrails.limitRange.maxMemory 12Gi"),
    "request above node cpu": (prod() | {"gpuPool": {**stack_values("prod")["gpuPool"],
                                                     "nodeShape": {"cpu": "2", "memory": "64Gi"}}},
                               "models[0].resources.requests.cpu: 4 is more than one GPU node has "
                               "(gpuPool.nodeShape.cpu 2); the pod can never schedule"),
    "request above node memory": (prod() | {"gpuPool": {**stack_values("prod")["gpuPool"],
                                                        "nodeShape": {"cpu": "32", "memory": "4Gi"}}},
                                  "models[0].resources.requests.memory: 8Gi is more than one GPU node has "
                                  "(gpuPool.nodeShape.memory 4Gi)"),
    "explicit surge without room": (prod(rollout={"maxSurge": 1, "maxUnavailable": 0}),
                                    "models[0].rollout.maxSurge: 1 needs 1 spare GPU(s) and room for 1 more pod(s) at "
                                    "maxReplicas, but the quota leaves 0 GPU(s) spare, so the rollout would wait "
                                    "forever; use maxSurge 0 / maxUnavailable 1, or raise guardrails.resourceQuota"),
    "cpu requests quota": (guardrails(prod(), "resourceQuota", requestsCpu="30"),
                           "guardrails.resourceQuota.requestsCpu: 30 is below what the models need at maxReplicas "
                           "and the gateway at its maxReplicas (plus one surge pod) (requests.cpu 47)"),
    "pvc count quota": (guardrails(prod(workload="statefulset", replicas=3, storage={"accessMode": "ReadWriteOnce"}),
                                   "resourceQuota", persistentVolumeClaims=5),
                        "guardrails.resourceQuota.persistentVolumeClaims: 5 is below the 10 model volumes the models "
                        "need at maxReplicas (one per Deployment, one per StatefulSet replica); raise it"),
    "storage class quota": (guardrails(prod(workload="statefulset", replicas=3,
                                            storage={"accessMode": "ReadWriteOnce", "size": "600Gi"}),
                                       "resourceQuota", storageByClass={"fast-ssd": "5Ti"}),
                            "guardrails.resourceQuota.storageByClass.fast-ssd: 5Ti is below the 6000 GiB of "
                            "fast-ssd model volumes at maxReplicas"),
    "maxModelLen above sizing": (prod(maxModelLen=16384),
                                 "models[0].maxModelLen: 16384 is above what the capacity check sized (8192)"),
    "maxNumSeqs above sizing": (prod(maxNumSeqs=64),
                                "models[0].maxNumSeqs: 64 is above what the capacity check sized (32)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_capacity_mistake_is_one_clear_error(case):
    values, message = BAD[case]
    with pytest.raises(ConfigError) as err:
        parse_stack_config("prod", values)
    text = str(err.value)
    assert text.startswith("stack 'prod': llm-platform:") and message in text, text


# ----------------------------------------------------------------------------------- good configs at the edge


def test_seventy_b_fits_at_four_gpus_on_vllm():
    values = guardrails(seventy_b(gpusPerReplica=4, **VLLM), "resourceQuota", gpus=40)
    plan = parse_stack_config("prod", values).plans[0]
    assert plan.memory["totalGiB"] == pytest.approx(60_687_320_128 / GIB)
    assert plan.shm == "8Gi"   # 2Gi per GPU


def test_startup_threshold_exactly_enough_passes():
    values = prod(probes={"startup": {"failureThreshold": 19}})   # 190 s >= 186.4 s
    model = parse_stack_config("prod", values).models[0]
    assert model.probes.startup.failure_threshold == 19


def test_surge_chosen_when_quota_has_exactly_one_spare_replica():
    values = guardrails(prod(), "resourceQuota", gpus=11)
    cfg = parse_stack_config("prod", values)
    assert (cfg.models[0].rollout.max_surge, cfg.models[0].rollout.max_unavailable) == (1, 0)
    assert "zero downtime" in cfg.plans[0].rollout


def test_memory_exactly_at_54_sequences_fits_and_55_does_not():
    assert parse_stack_config("prod", with_sizing(maxConcurrentSequences=54)).plans[0].memory["headroomGiB"] >= 0
    with pytest.raises(ConfigError, match="maxConcurrentSequences <= 54"):
        parse_stack_config("prod", with_sizing(maxConcurrentSequences=55))


def test_sizing_sets_the_engine_limits_and_the_plan_is_an_output():
    values = stack_values("prod")
    values["gpuPool"]["hourlyCostPerGpu"] = 2.5
    result = render_values("prod", values)
    env = {e["name"]: e["value"] for e in
           result.one("Deployment", "llm-service")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["MAX_MODEL_LEN"], env["MAX_NUM_SEQS"]) == ("8192", "32")
    plan = result.outputs["capacityPlan"]["llm-service"]
    assert (plan["gpusAtMin"], plan["gpusAtMax"]) == (2, 10)
    assert (plan["cost_per_hour_min"], plan["cost_per_hour_max"]) == (5.0, 25.0)
    assert plan["max_sequences_at_full_context"] == 54
    assert plan["startup_budget_seconds"] == 300
    assert any("cost: 5.00/h at min, 25.00/h at max" in line for line in plan["summary"])


def test_multi_gpu_pod_mounts_memory_backed_shm():
    values = guardrails(seventy_b(gpusPerReplica=4, resources={"limits": {"memory": "64Gi"},
                                                                "requests": {"memory": "32Gi"}}, **VLLM),
                        "resourceQuota", gpus=40, requestsMemory="400Gi", limitsMemory="800Gi")
    result = render_values("prod", values)
    pod = result.one("Deployment", "llm-service")["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
