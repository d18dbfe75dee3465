"""Runtimes and layouts: the builtin engine's limits, the vLLM runtime's typed settings, and multi-node vLLM on a
LeaderWorkerSet. Every rule is fed its bad case and checked for its message; the good layouts are rendered under
the mocks and checked on the captured manifests."""
from __future__ import annotations

import pytest

from llm_platform import capacity
from llm_platform.builders import group_network_policy_spec, vllm_args
from llm_platform.capacity import PRESETS, Sizing
from llm_platform.config import ConfigError, owned_vllm_flag
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values

MULTINODE = "examples/Pulumi.prod-405b-multinode.yaml"
TP4 = "examples/Pulumi.prod-70b-tp4.yaml"
SERVING_IMAGE = "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"
VLLM_IMAGE = "registry.example.com/vllm/vllm-openai:v0.30.0@sha256:5e4c9e21916e060cad31033c82914c1bee10e6fdba3250a7e680495a0619a47d"
VLLM = {"runtime": "vllm", "image": VLLM_IMAGE, "fill": {"secretName": "hf-token", "image": SERVING_IMAGE}}


def prod(**changes):
    values = stack_values("prod")
    values["models"][0].update(changes)
    return values


def multinode(**changes):
    values = stack_values(MULTINODE)
    values["models"][0].update(changes)
    return values


def tp4(**vllm):
    values = stack_values(TP4)
    values["models"][0]["vllm"].update(vllm)
    return values


def sizing(**changes):
    return {"preset": "llama-3.1-8b", "maxContextTokens": 8192, "maxConcurrentSequences": 32, **changes}


BAD = {
    # The builtin engine loads onto one device in bfloat16/float16.
    "builtin on 4 GPUs": (prod(gpusPerReplica=4),
                          "models[0].gpusPerReplica: 4: the builtin engine loads a model onto one GPU (the others "
                          "would sit idle while it runs out of memory); use 1, or runtime: vllm, which splits a model "
                          "across GPUs (tensor parallel)"),
    "builtin fp8 weights": (prod(sizing=sizing(dtype="float8")),
                            "models[0].sizing.dtype: 'float8': the builtin engine loads bfloat16 or float16 weights "
                            "only; use runtime: vllm with vllm.quantization"),
    "builtin int4 weights": (prod(sizing=sizing(dtype="int4")), "models[0].sizing.dtype: 'int4': the builtin engine"),
    "builtin with vllm settings": (prod(vllm={"kvCacheDtype": "fp8"}),
                                   "models[0].vllm: is for runtime: vllm; the builtin engine takes none"),
    "builtin on a leaderworkerset": (prod(workload="leaderworkerset"),
                                     "models[0].workload: 'leaderworkerset' runs vLLM across nodes; use runtime: vllm"),
    # vLLM settings must agree with what the plan sized.
    "fp8 sizing without quantization": (prod(**VLLM, sizing=sizing(dtype="float8")),
                                        "models[0].vllm.quantization: is required with sizing.dtype 'float8': without "
                                        "it vLLM loads 16-bit weights"),
    "awq for fp8 sizing": (prod(**VLLM, sizing=sizing(dtype="float8"), vllm={"quantization": "awq"}),
                           "models[0].vllm.quantization: 'awq' does not give float8 weights as sizing.dtype says; use "
                           "one of fp8, fbgemm_fp8, compressed-tensors, modelopt"),
    "quantization on 16-bit sizing": (prod(**VLLM, vllm={"quantization": "fp8"}),
                                      "models[0].vllm.quantization: 'fp8' quantizes the weights, but sizing.dtype is "
                                      "'bfloat16'"),
    "fp8 sizing without kv dtype": (prod(**VLLM, sizing=sizing(dtype="float8"), vllm={"quantization": "fp8"}),
                                    "models[0].vllm.kvCacheDtype: is required with sizing.dtype 'float8': fp8 weights "
                                    "do not make an fp8 KV cache; set fp8 (the plan sizes 1 byte per KV value) or "
                                    "auto"),
    "batched tokens below seqs": (tp4(maxNumBatchedTokens=16),
                                  "models[0].vllm.maxNumBatchedTokens: 16 is below maxNumSeqs 32; vLLM refuses to "
                                  "start"),
    "owned flag in extraArgs": (tp4(extraArgs=["--max-model-len=4096"]),
                                "models[0].vllm.extraArgs[0]: '--max-model-len=4096': --max-model-len is set by the "
                                "platform from sizing.maxContextTokens / maxModelLen; set that instead"),
    "owned flag, underscores": (tp4(extraArgs=["--pipeline_parallel_size", "2"]),
                                "models[0].vllm.extraArgs[0]: '--pipeline_parallel_size': --pipeline-parallel-size is "
                                "set by the platform from gpusPerReplica / gpuPool.gpusPerNode"),
    "owned flag, negated": (tp4(extraArgs=["--no-enable-prefix-caching"]),
                            "--enable-prefix-caching is set by the platform from vllm.enablePrefixCaching"),
    "api key in extraArgs": (tp4(extraArgs=["--api-key", "x"]),
                             "--api-key is set by the platform from the generated API-key Secret"),
    "unpinned lora": (tp4(loraAdapters={"sql": "hf://acme/sql-lora@main"}),
                      "models[0].vllm.loraAdapters.sql: "),
    "lora without base source": (prod(**VLLM, source=None, vllm={
        "loraAdapters": {"sql": "s3://adapters/sql/v1"}}),
        "models[0].vllm.loraAdapters.sql: needs the base model's source"),
    "lora named like the model": (tp4(loraAdapters={"llama-3.1-70b-instruct": "s3://adapters/x/v1"}),
                                  "is the base model's servedModelName; give the adapter its own name"),
    "lora rank not allowed": (tp4(loraAdapters={"sql": "s3://adapters/sql/v1"}, maxLoraRank=48),
                              "models[0].vllm.maxLoraRank: 48 is not a rank vLLM accepts; use one of 1, 8, 16, 32, 64"),
    "lora rank without adapters": (tp4(maxLoraRank=16), "models[0].vllm.maxLoraRank: is set without loraAdapters"),
    "bad parser name": (tp4(toolCallParser="Llama 3 JSON"),
                        "models[0].vllm.toolCallParser: 'Llama 3 JSON' is not a parser name"),
    "api key as an env "
    "literal": (tp4() | {"models": [{**stack_values(TP4)["models"][0], "env": {"VLLM_API_KEY": "k"}}]},
                                  "models[0].env.VLLM_API_KEY: is set by the platform from the generated API-key "
                                  "Secret"),
    # Multi-node layouts that cannot work.
    "explicit deployment across nodes": (multinode(workload="deployment"),
                                         "models[0].gpusPerReplica: 16 is more than gpuPool.gpusPerNode 8; a "
                                         "deployment pod cannot span nodes; use workload: leaderworkerset"),
    "not whole nodes": (multinode(gpusPerReplica=12),
                        "models[0].gpusPerReplica: 12 with workload leaderworkerset must be a multiple of "
                        "gpuPool.gpusPerNode 8 above it (2 nodes or more: 16, 24, ...)"),
    "leaderworkerset on one node": (multinode(workload="leaderworkerset", gpusPerReplica=8),
                                    "models[0].gpusPerReplica: 8 with workload leaderworkerset must be a multiple"),
    "leaderworkerset without gpusPerNode": (
        {**multinode(workload="leaderworkerset"),
         "gpuPool": {k: v for k, v in stack_values(MULTINODE)["gpuPool"].items() if k != "gpusPerNode"}},
        "gpuPool.gpusPerNode: is required for models[0].workload leaderworkerset"),
    "group name too long": (multinode(name="a" * 51),
                            "is too long for a LeaderWorkerSet (51 characters): its pods are named "
                            "<name>-lws-<group>-<index> and must stay a DNS label; use at most 50"),
    "lora on a statefulset": (tp4(loraAdapters={"sql": "s3://adapters/sql/v1"}) | {"models": [{
        **stack_values(TP4)["models"][0], "workload": "statefulset", "storage": {"accessMode": "ReadWriteOnce"},
        "vllm": {"loraAdapters": {"sql": "s3://adapters/sql/v1"}}}]},
        "models[0].vllm.loraAdapters: are filled by the fill Job onto a shared claim; use workload deployment"),
    "group on a ReadWriteOnce claim": (multinode(storage={"accessMode": "ReadWriteOnce"}),
                                       "models[0].storage.accessMode: ReadWriteOnce cannot be mounted by the 2 nodes "
                                       "of a LeaderWorkerSet group"),
    "405b fp8 on one node": (multinode(gpusPerReplica=8, workload="deployment"),
                             "or gpusPerReplica 16 on 2 nodes of 8 GPUs (runtime: vllm, workload: "
                             "leaderworkerset: tensor parallel 8 x pipeline parallel 2)"),
    "group quota counts every pod": (
        {**multinode(), "guardrails": {**stack_values(MULTINODE)["guardrails"],
                                       "resourceQuota": {**stack_values(MULTINODE)["guardrails"]["resourceQuota"],
                                                         "requestsMemory": "1Ti"}}},
        "guardrails.resourceQuota.requestsMemory: 1Ti is below what the models need at maxReplicas (requests.memory "
        "1536 GiB)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_layout_mistake_is_one_clear_error(case):
    values, message = BAD[case]
    with pytest.raises(ConfigError) as err:
        parse_stack_config("prod", values)
    text = str(err.value)
    assert text.startswith("stack 'prod': llm-platform:") and message in text, text


# ----------------------------------------------------------------------------------------------- pure builders


def test_owned_flag_detection():
    assert owned_vllm_flag("--kv_cache_dtype=fp8") == "kv-cache-dtype"
    assert owned_vllm_flag("--no-enable-prefix-caching") == "enable-prefix-caching"
    assert owned_vllm_flag("--speculative-config") is None and owned_vllm_flag("fp8") is None


def test_kv_cache_dtype_drives_the_plan():
    arch = PRESETS["llama-3.1-405b"]
    fp8, auto = Sizing(arch, "float8", 8192, 1, "fp8"), Sizing(arch, "float8", 8192, 1, "auto")
    assert capacity.kv_bytes_per_token(fp8) == 2 * 126 * 8 * 128 * 1
    assert capacity.kv_bytes_per_token(auto) == 2 * capacity.kv_bytes_per_token(fp8)
    assert capacity.smallest_layout_that_fits(Sizing(arch, "float8", 16384, 128, "fp8"),
                                              capacity.usable_bytes(80, 0.9), 8) == (8, 2)


def test_group_network_policy_is_the_group_to_itself():
    spec = group_network_policy_spec("llama-405b")
    assert spec["ingress"][0]["from"] == [{"podSelector": spec["podSelector"]}]
    assert spec["egress"][0]["to"] == [{"podSelector": spec["podSelector"]}]
    assert {(p["port"], p.get("endPort")) for p in spec["ingress"][0]["ports"]} == {(29501, None), (32768, 60999)}


# ------------------------------------------------------------------------------------------ rendered layouts


@pytest.fixture(scope="module")
def multinode_result():
    return render_values("prod", stack_values(MULTINODE))


def test_builtin_plan_suggests_vllm_not_more_gpus():
    values = prod(sizing={"preset": "llama-3.1-70b", "maxContextTokens": 8192, "maxConcurrentSequences": 32})
    with pytest.raises(ConfigError, match="runtime: vllm with gpusPerReplica 4"):
        parse_stack_config("prod", values)


def test_multinode_is_chosen_automatically_and_planned(multinode_result):
    cfg = parse_stack_config("prod", stack_values(MULTINODE))
    model, plan = cfg.config.models[0], cfg.plans[0]
    assert (model.workload, model.nodes_per_replica, model.gpus_per_pod) == ("leaderworkerset", 2, 8)
    assert (plan.gpus_at_min, plan.gpus_at_max) == (32, 48)
    assert plan.lines()[0].endswith("(2 nodes per replica: 4 nodes at min, 6 at max)")
    assert "tensor parallel 8 inside each node x pipeline parallel 2 across nodes" in plan.layout
    assert plan.memory["headroomGiB"] > 0 and plan.shm == "16Gi"


def test_leaderworkerset_group(multinode_result):
    lws = multinode_result.one("LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["metadata"]["name"] == "llama-405b-lws"
    spec = lws["spec"]
    group = spec["leaderWorkerTemplate"]
    assert (spec["replicas"], group["size"], group["restartPolicy"], spec["startupPolicy"]) == \
        (2, 2, "RecreateGroupOnPodRestart", "LeaderCreated")
    assert spec["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxSurge": 1, "maxUnavailable": 0}
    leader, worker = group["leaderTemplate"], group["workerTemplate"]
    assert leader["metadata"]["labels"]["llm-platform/role"] == "leader"
    assert worker["metadata"]["labels"]["llm-platform/role"] == "worker"
    lc, wc = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
    for c in (lc, wc):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        args = c["args"]

        def flag(name, args=args):
            return args[args.index(name) + 1]

        assert (flag("--tensor-parallel-size"), flag("--pipeline-parallel-size"), flag("--nnodes")) == ("8", "2", "2")
        assert (flag("--node-rank"), flag("--master-addr")) == ("$(LWS_WORKER_INDEX)", "$(LWS_LEADER_ADDRESS)")
        assert (flag("--quantization"), flag("--kv-cache-dtype")) == ("fbgemm_fp8", "fp8")
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert "--headless" in wc["args"] and "--headless" not in lc["args"]
    # Probes and the API key on the leader only: a worker serves no HTTP; its death recreates the group.
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(lc) and not {"livenessProbe"} & set(wc)
    assert any(m["name"] == "api-keys" for m in lc["volumeMounts"])
    assert not any(m["name"] == "api-keys" for m in wc["volumeMounts"])
    assert not any(v["name"] == "api-keys" for v in worker["spec"]["volumes"])
    # Every node of every group mounts the one shared claim and checks the same pinned revision before it starts.
    for t in (leader, worker):
        claim = next(v for v in t["spec"]["volumes"] if v["name"] == "model-storage")
        assert claim["persistentVolumeClaim"] == {"claimName": "llama-405b-models", "readOnly": True}
        check = t["spec"]["initContainers"][0]
        assert check["name"] == "model-check" and "--verify" in check["command"]
        assert check["command"][-1] == lc["args"][0] == "/models/llama-405b/s3-5aae6223"


def test_service_pdb_autoscaler_and_network_follow_the_groups(multinode_result):
    svc = multinode_result.one("Service")
    assert svc["spec"]["selector"] == {"app": "llama-405b", "llm-platform/role": "leader"}
    pdb = multinode_result.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == {"matchLabels": {"app": "llama-405b"}} and pdb["spec"]["maxUnavailable"] == 2
    hpa = multinode_result.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                             "name": "llama-405b-lws"}
    policy = multinode_result.one("NetworkPolicy", "llama-405b-group")
    assert policy["spec"] == group_network_policy_spec("llama-405b")
    assert multinode_result.one("Job")["metadata"]["name"].startswith("llama-405b-fill-")


def test_keda_targets_the_leaderworkerset_scale_subresource():
    values = multinode(autoscaling={"enabled": True, "mode": "keda", "minReplicas": 0, "maxReplicas": 3}, replicas=1)
    values["addons"]["keda"] = {"enabled": True}
    values["gateway"] = {"enabled": True}  # scale to zero: the gateway holds the first request, its count wakes
    result = render_values("prod", values)
    spec = result.one("ScaledObject")["spec"]
    assert spec["scaleTargetRef"] == \
        {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": "llama-405b-lws"}
    assert "llm_gateway_pending_requests" in spec["triggers"][0]["metadata"]["query"]
    # The gateway finds the groups through their leaders (the workers serve no HTTP), and runs from the serving
    # image the fill names (this model's own image is vLLM's).
    endpoints = result.one("Service", "llama-405b-endpoints")["spec"]
    assert endpoints["selector"] == {"app": "llama-405b", "llm-platform/role": "leader"}
    assert result.one("Deployment", "llm-gateway")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        SERVING_IMAGE


def test_cluster_addons_install_the_pinned_lws_chart(multinode_result):
    (release,) = [r for r in multinode_result.helm_releases() if r["name"] == "lws"]
    assert (release["chart"], release["version"], release["namespace"]) == \
        ("oci://registry.k8s.io/lws/charts/lws", "0.10.0", "lws-system")
    assert "repositoryOpts" not in release


def test_vllm_settings_become_flags_and_lora_adapters_are_filled():
    values = tp4(loraAdapters={"sql": "s3://adapters/llama-70b-sql/v3"}, maxLoraRank=16, reasoningParser="deepseek_r1",
                 enablePrefixCaching=False)
    result = render_values("prod", values)
    pod = result.one("Deployment")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "/models/llama-70b/s3-a183d718"
    path = "/models/llama-70b/lora-sql/s3-" + args[args.index("--lora-modules") + 1].rsplit("s3-", 1)[1]
    assert args[args.index("--lora-modules") + 1] == f"sql={path}"
    for flag in ("--enable-lora", "--no-enable-prefix-caching", "--enable-auto-tool-choice"):
        assert flag in args
    assert args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert args[-2:] == ["--uvicorn-log-level", "warning"]          # extraArgs last
    assert [c["command"][-1] for c in pod["initContainers"]] == ["/models/llama-70b/s3-a183d718", path]
    job = result.one("Job")
    fills = job["spec"]["template"]["spec"]["containers"]
    assert [c["command"][-2:] for c in fills] == [["s3://models/meta-llama/Llama-3.1-70B-Instruct/2024-07-23",
                                                   "/models/llama-70b/s3-a183d718"],
                                                  ["s3://adapters/llama-70b-sql/v3", path]]
    # A new adapter set is a new fill Job (Jobs are immutable).
    assert job["metadata"]["name"] != render_values("prod", stack_values(TP4)).one("Job")["metadata"]["name"]


def test_worker_args_match_the_leader_but_headless():
    cfg = parse_stack_config("prod", stack_values(MULTINODE))
    model = cfg.models[0]
    leader, worker = vllm_args(model), vllm_args(model, "worker")
    at = leader.index("--master-port") + 2
    assert worker == leader[:at] + ["--headless"] + leader[at:]


def test_without_the_operator_only_leaders_carry_scrape_hints():
    values = multinode()
    values["observability"] = {"prometheusOperator": False}
    group = render_values("prod", values).one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    assert group["leaderTemplate"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert not any(k.startswith("prometheus.io/") for k in group["workerTemplate"]["metadata"].get("annotations", {}))
    assert group["workerTemplate"]["metadata"]["annotations"]["llm-platform/model-source"].startswith("s3://")
