"""Layer 1: every rendered manifest passes Kubernetes' own OpenAPI schemas (strict) for 1.30 and 1.33."""
from __future__ import annotations

import pytest
from kubernetes_validate.utils import all_versions

from tests.validation.conftest import manifests_of, pick, prod_manifests, stacks
from validation.crds import is_custom_resource
from validation.schemas import KUBERNETES_VERSIONS, check_schemas


def test_supported_versions_are_shipped():
    assert set(KUBERNETES_VERSIONS) == {"1.30.0", "1.33.0"}
    assert set(KUBERNETES_VERSIONS) <= set(all_versions())


@stacks()
def test_stack_passes_schemas(stack_file):
    manifests = manifests_of(stack_file)
    assert manifests, "the stack rendered nothing"
    assert check_schemas(manifests) == []


def _break_container_field(ms):
    pick(ms, "Deployment")["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    return "Deployment/ai-production/llm-service", "imagePullPolcy", {"k8s-1.30", "k8s-1.33"}


def _break_port_type(ms):
    pick(ms, "Service", "llm-service")["spec"]["ports"][0]["port"] = "eighty"
    return "Service/ai-production/llm-service", "spec.ports.0.port", {"k8s-1.30", "k8s-1.33"}


def _break_required(ms):
    del pick(ms, "HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    return "HorizontalPodAutoscaler/ai-production/llm-service-hpa", "maxReplicas", {"k8s-1.30", "k8s-1.33"}


def _break_pdb_field(ms):
    pick(ms, "PodDisruptionBudget")["spec"]["maxUnavaliable"] = 1
    return "PodDisruptionBudget/ai-production/llm-service-pdb", "maxUnavaliable", {"k8s-1.30", "k8s-1.33"}


def _newer_than_130(ms):
    # Pod-level resources arrived in Kubernetes 1.32: fine for 1.33, unknown to 1.30. Proves both versions run.
    pick(ms, "Deployment")["spec"]["template"]["spec"]["resources"] = {"limits": {"cpu": "8"}}
    return "Deployment/ai-production/llm-service", "resources", {"k8s-1.30"}


def _custom_resource_without_schema(ms):
    ms.append({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
               "metadata": {"name": "llm-tls", "namespace": "ai-production"},
               "spec": {"secretName": "llm-tls", "issuerRef": {"name": "letsencrypt-prod", "kind": "ClusterIssuer"}}})
    return "Certificate/ai-production/llm-tls", "validation/crds.py", {"k8s-1.30", "k8s-1.33"}


@pytest.mark.parametrize("breaker", [_break_container_field, _break_port_type, _break_required, _break_pdb_field,
                                     _newer_than_130, _custom_resource_without_schema],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_broken_manifest_fails(breaker):
    manifests = prod_manifests()
    resource, expected_text, versions = breaker(manifests)
    findings = check_schemas(manifests)
    assert {f.check for f in findings} == versions
    assert {f.resource for f in findings} == {resource}
    assert all(expected_text in f.message for f in findings), findings


def test_custom_resources_are_left_to_the_crd_layer():
    manifests = prod_manifests()
    custom = [m for m in manifests if is_custom_resource(m)]
    assert {m["kind"] for m in custom} == {"ServiceMonitor", "PrometheusRule", "SnapshotSchedule"}
    pick(manifests, "ServiceMonitor")["spec"]["notAField"] = True
    assert check_schemas(manifests) == []
