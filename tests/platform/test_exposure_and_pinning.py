"""No plain-HTTP public path, only the API behind the Ingress, images pinned by digest in prod, a pinned Pod Security
version, no plain-HTTP model sources in prod, and one claim per filled model."""
from __future__ import annotations

import pytest

from llm_platform.config import ConfigError, parse_image
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values

DIGEST = "sha256:" + "ab" * 32
PROD_IMAGE = "registry.example.com/llm-serving:1.0.0@sha256:" \
             "076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"


def config_error(stack: str, values: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_stack_config(stack, values)
    return str(err.value)


def without_gateway(values: dict) -> dict:
    values["gateway"] = {"enabled": False}
    return values


# ------------------------------------------------------------------------------------------- exposure


def test_a_load_balancer_without_source_ranges_is_refused():
    values = without_gateway(stack_values("prod"))
    values["models"][0]["serviceType"] = "LoadBalancer"
    assert config_error("prod", values) == (
        "stack 'prod': llm-platform:models[0].serviceType: LoadBalancer without loadBalancerSourceRanges publishes "
        "plain HTTP (API keys, prompts, /metrics) to the whole internet beside the TLS Ingress; use ClusterIP behind "
        "the Ingress, or list the callers' CIDRs in loadBalancerSourceRanges")


def test_a_narrowed_load_balancer_renders_its_ranges_and_keeps_client_addresses():
    values = without_gateway(stack_values("prod"))
    values["guardrails"]["allowFrom"]["ipBlocks"] = ["203.0.113.0/24"]
    values["models"][0].update(serviceType="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"])
    assert "externalTrafficPolicy: Cluster: with guardrails.allowFrom.ipBlocks the load balancer must keep the " \
           "client's address" in config_error("prod", values)
    values["models"][0]["externalTrafficPolicy"] = "Local"
    svc = render_values("prod", values).one("Service", "llm-service")["spec"]
    assert (svc["type"], svc["loadBalancerSourceRanges"], svc["externalTrafficPolicy"]) == \
        ("LoadBalancer", ["203.0.113.0/24"], "Local")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(serviceType="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"]),
     "models[0].serviceType: LoadBalancer: with gateway.enabled the model pods accept only the gateway"),
    (lambda m: m.update(loadBalancerSourceRanges=["203.0.113.0/24"]),
     "models[0].loadBalancerSourceRanges: is only for serviceType LoadBalancer (this model's Service is ClusterIP)"),
    (lambda m: m.update(serviceType="LoadBalancer", loadBalancerSourceRanges=["everyone"]),
     "models[0].loadBalancerSourceRanges[0]: 'everyone' is not a CIDR"),
])
def test_bad_exposure_is_one_clear_error(change, message):
    values = stack_values("prod")
    change(values["models"][0])
    assert config_error("prod", values).startswith(f"stack 'prod': llm-platform:{message}")


def test_only_the_api_is_routed_through_a_model_ingress(rendered):
    """/metrics and /health/* stay in the cluster (the article routed `/`)."""
    (path,) = rendered("staging").one("Ingress")["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")


# -------------------------------------------------------------------------------------------- pinning


@pytest.mark.parametrize("image, expected", [
    ("registry.example.com/llm-serving:1.0.0", ("registry.example.com/llm-serving", "1.0.0", None)),
    (f"registry.example.com:5000/llm-serving@{DIGEST}", ("registry.example.com:5000/llm-serving", None, DIGEST)),
    (f"llm-serving:1.0.0@{DIGEST}", ("llm-serving", "1.0.0", DIGEST)),
    ("registry.example.com:5000/llm-serving", ("registry.example.com:5000/llm-serving", None, None)),
])
def test_parse_image(image, expected):
    assert parse_image(image) == expected


@pytest.mark.parametrize("tag", ["main", "master", "develop", "nightly", "edge", "stable", "latest", "Main"])
def test_branch_like_tags_are_refused_in_every_stack(tag):
    values = stack_values("staging")
    values["models"][0]["image"] = f"registry.example.com/llm-serving:{tag}"
    assert config_error("staging", values).startswith(
        f"stack 'staging': llm-platform:models[0].image: 'registry.example.com/llm-serving:{tag}' is not pinned: "
        f"'{tag}' names a branch or channel that moves to new builds")


def test_prod_stacks_require_digests_and_other_stacks_may_opt_in():
    values = stack_values("prod")
    values["models"][0]["image"] = "registry.example.com/llm-serving:1.0.0"
    assert config_error("prod", values) == (
        "stack 'prod': llm-platform:models[0].image: 'registry.example.com/llm-serving:1.0.0' has no digest, and this "
        "stack requires digests (stacks named prod*, or requireDigests): append the digest the registry reports, as "
        "registry.example.com/llm-serving:1.0.0@sha256:<64 hex>, so that what runs is exactly the image that was "
        "reviewed")
    values["requireDigests"] = False
    parse_stack_config("prod", values)
    staging = stack_values("staging")
    parse_stack_config("staging", staging)
    staging["requireDigests"] = True
    assert "models[0].image: 'registry.example.com/llm-serving:1.0.0' has no digest" in config_error("staging", staging)


def test_every_image_a_prod_stack_runs_is_by_digest(rendered):
    prod = rendered("prod")
    pods = [w["spec"]["template"]["spec"] for w in prod.of_kind("Deployment")] + \
        [j["spec"]["template"]["spec"] for j in prod.of_kind("Job")]
    images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {PROD_IMAGE}


@pytest.mark.parametrize("where, change", [
    ("gateway.image", lambda v: v["gateway"].update(image="registry.example.com/llm-serving:1.0.1")),
    ("models[0].fill.image", lambda v: v["models"][0]["fill"].update(image="registry.example.com/llm-serving:1.0.1")),
])
def test_prod_digests_cover_the_gateway_and_fill_images(where, change):
    values = stack_values("prod")
    change(values)
    assert config_error("prod", values).startswith(f"stack 'prod': llm-platform:{where}: "
                                                   "'registry.example.com/llm-serving:1.0.1' has no digest")


def test_a_malformed_digest_is_refused():
    values = stack_values("prod")
    values["models"][0]["image"] = "registry.example.com/llm-serving:1.0.0@sha256:1234"
    assert "'sha256:1234' is not a digest; write @sha256: and the 64 hex digits" in config_error("prod", values)


def test_the_default_vllm_image_needs_a_digest_in_prod():
    values = stack_values("prod")
    model = values["models"][0]
    model.update(runtime="vllm", fill={"secretName": "hf-token", "image": PROD_IMAGE})
    del model["image"]
    assert "models[0].image: is unset, so the vllm runtime's default" in config_error("prod", values)


# ------------------------------------------------------------------------------------ pod security


def test_pod_security_labels_are_pinned_to_a_version(rendered):
    labels = rendered("prod").one("Namespace")["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
        assert labels[f"pod-security.kubernetes.io/{mode}-version"] == "v1.33"


@pytest.mark.parametrize("version", ["latest", "1.33", "v2.0", "v1"])
def test_an_unpinned_pod_security_version_is_refused(version):
    values = stack_values("prod")
    values["guardrails"]["podSecurityVersion"] = version
    assert config_error("prod", values).startswith(
        f"stack 'prod': llm-platform:guardrails.podSecurityVersion: {version!r} is not a pinned Kubernetes version")


# -------------------------------------------------------------------------------------- model fills


@pytest.mark.parametrize("key, url", [("hfEndpoint", "http://hf-mirror.internal"),
                                      ("s3Endpoint", "http://minio.model-storage.svc:9000")])
def test_plain_http_sources_are_refused_in_prod(key, url):
    values = stack_values("staging")
    values["models"][0]["fill"][key] = url
    source_kind = "hf" if key == "hfEndpoint" else "s3"
    if source_kind == "hf":
        values["models"][0]["source"] = "hf://meta-llama/Llama-3.1-8B-Instruct@" + "0" * 40
    values["models"][0]["fill"].pop("hfEndpoint" if key == "s3Endpoint" else "s3Endpoint", None)
    parse_stack_config("staging", values)  # outside prod, an in-cluster plain-HTTP store is allowed
    values["requireDigests"] = False
    assert config_error("prod-eu", values).startswith(
        f"stack 'prod-eu': llm-platform:models[0].fill.{key}: {url!r} is plain HTTP, which would send the "
        "source's token or keys in clear")


def test_two_filled_models_on_one_claim_are_refused():
    values = stack_values("prod")
    first = values["models"][0] = {**values["models"][0], "autoscaling": {"minReplicas": 2, "maxReplicas": 4}}
    values["models"].append({**first, "name": "llm-copy", "servedModelName": "llama-copy"})
    assert config_error("prod", values) == (
        "stack 'prod': llm-platform:models[1].storage.claimName: 'model-pvc' is already the model claim of models[0] "
        "(llm-service); each model's volume is its own claim (one model's fill would prune the other's revisions); "
        "give it its own claimName, or serve a shared volume through a pvc:// source")
    values["models"][1]["storage"] = {**first["storage"], "claimName": "copy-pvc"}
    parse_stack_config("prod", values)
