"""Model storage: pinned sources, the fill Job or init container, offline serving, backups and restore.

Whole-program renders under the recording mocks (the exact manifests, dependencies and timeouts), pure builders
without mocks, and every config guard fed its bad case.
"""
from __future__ import annotations

import dataclasses

import pytest

from components.model_storage import (
    NON_PUBLIC_IPV4,
    VOLUME_LABEL,
    fill_egress_policy_spec,
    model_claim_spec,
)
from llm_platform.builders import FILL_LABEL, SOURCE_CREDENTIALS_DIR, fetch_container
from llm_platform.config import ConfigError, FillConfig, ModelConfig
from llm_platform.model_source import SourceError, parse_source
from llm_platform.stack import parse_stack_config
from serving.fetch import sources as fetch_sources
from tests.conftest import render_values, stack_values
from tests.platform.planned import planned

SHA = "0e9e39f249a16976918f6564b8830bc894c89659"
OTHER_SHA = "5206a32e0bd3067aef1ce90f5528ade7d866253f"


def prod_with(**model_changes):
    values = stack_values("prod")
    values["models"][0].update(model_changes)
    return values


def pod(workload):
    return workload["spec"]["template"]


def init_container(workload):
    (container,) = pod(workload)["spec"]["initContainers"]
    return container


def captured(result, type_suffix, name=None):
    found = [r for r in result.resources if r.type.endswith(type_suffix) and (name is None or r.name == name)]
    assert len(found) == 1, [r.name for r in found]
    return found[0]


def config_error(stack, values):
    with pytest.raises(ConfigError) as err:
        parse_stack_config(stack, values)
    return str(err.value)


# ---------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("uri, kind, pinned, directory", [
    (f"hf://meta-llama/Llama-3.1-8B-Instruct@{SHA}", "hf", True, SHA[:12]),
    ("hf://meta-llama/Llama-3.1-8B-Instruct@main", "hf", False, None),
    ("hf://meta-llama/Llama-3.1-8B-Instruct", "hf", False, None),
    ("hf://org/model@v1.0", "hf", False, None),
    ("s3://models/llama-3.1-8b/2024-07-23", "s3", True, None),
    ("pvc://shared-models/llama-3.1-8b", "pvc", True, None),
])
def test_source_grammar(uri, kind, pinned, directory):
    src = parse_source(uri)
    assert (src.kind, src.pinned) == (kind, pinned)
    if directory:
        assert src.directory == directory
    if kind != "pvc":
        assert "/" not in src.directory and src.directory not in ("", ".", "..")


@pytest.mark.parametrize("uri", ["http://example.com/model", "hf://only-org", "hf://a/b/c@x", "hf://org/name@",
                                 "s3://models", "s3://Bad_Bucket/x", "pvc://claim", "pvc://claim/../etc",
                                 "gs://bucket/x", "/models/llama"])
def test_bad_source_uris_are_refused(uri):
    with pytest.raises(SourceError) as err:
        parse_source(uri)
    assert uri in str(err.value)


def test_the_platform_and_the_downloader_agree_on_the_grammar():
    """The program and serving.fetch parse source URIs separately: every URI the program accepts (and so writes into
    a fill command) the downloader accepts, with the same pinned/unpinned verdict and the same model; a URI the
    downloader refuses the program refuses first, at preview."""
    good = [f"hf://org/name@{SHA}", "hf://org/name@main", "hf://org/name@v1.0", "hf://org/name",
            "s3://models/a/b", "s3://models/a/b/", "pvc://claim/dir", "pvc://claim/a/b"]
    for uri in good:
        platform, image = parse_source(uri), fetch_sources.parse_source(uri)
        assert platform.pinned == image.pinned, uri
        if platform.kind == "hf":
            assert (platform.location, platform.revision or "main") == (image.repo_id, image.revision), uri
        elif platform.kind == "s3":
            assert (platform.location, platform.path) == (image.bucket, image.prefix), uri
        else:
            assert (platform.location, platform.path) == (image.claim, image.path), uri
    for uri in ["http://x/y", "hf://org", "hf://a/b/c@x", "s3://models", "s3://Bad_Bucket/x", "pvc://claim/../etc",
                "gs://bucket/x", "/models/llama"]:
        with pytest.raises(fetch_sources.FetchError):
            fetch_sources.parse_source(uri)
        with pytest.raises(SourceError):
            parse_source(uri)


def test_revision_directories_differ_per_revision():
    a, b = parse_source(f"hf://o/n@{SHA}"), parse_source(f"hf://o/n@{OTHER_SHA}")
    assert a.directory != b.directory and a.short_id != b.short_id
    assert parse_source("s3://models/a/1").directory != parse_source("s3://models/a/2").directory


# ---------------------------------------------------------------------------------------- prod: hf + Job


def test_prod_fill_job_downloads_the_pinned_revision_into_its_own_directory(rendered):
    prod = rendered("prod")
    (job,) = prod.of_kind("Job")
    src = parse_source(f"hf://meta-llama/Llama-3.1-8B-Instruct@{SHA}")
    assert job["metadata"]["name"] == f"llm-service-fill-{src.short_id}"
    assert job["metadata"]["annotations"]["pulumi.com/replaceUnready"] == "true"
    spec = job["spec"]
    assert spec["backoffLimit"] == 6 and spec["activeDeadlineSeconds"] == 14400
    assert spec["podReplacementPolicy"] == "Failed"  # a retry waits for the terminating pod: one writer at a time
    template = spec["template"]
    assert template["spec"]["restartPolicy"] == "Never"
    (container,) = template["spec"]["containers"]
    assert container["image"] == "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"
    assert container["command"] == ["python", "-m", "serving.fetch", "--keep-revisions", "2", src.uri,
                                    f"/models/llama-3.1-8b/{SHA[:12]}"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-storage"] == {"name": "model-storage", "mountPath": "/models", "readOnly": False}
    assert mounts["source-credentials"]["mountPath"] == SOURCE_CREDENTIALS_DIR
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["model-storage"]["persistentVolumeClaim"] == {"claimName": "model-pvc"}
    assert volumes["source-credentials"]["secret"]["secretName"] == "hf-token"
    env = {e["name"]: e for e in container["env"]}
    assert env["MODEL_SOURCE_CREDENTIALS_DIR"]["value"] == SOURCE_CREDENTIALS_DIR
    assert not any("valueFrom" in e for e in container["env"])        # the token is a file, never env
    assert env["HF_HUB_OFFLINE"]["value"] == "0"          # the image is offline by default; only the fill is not
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Fill pods are not serving pods: no Service, PDB or HPA may count them.
    labels = template["metadata"]["labels"]
    assert "app" not in labels and labels[FILL_LABEL] == "llm-service"
    assert labels["app.kubernetes.io/component"] == "model-fill"


def test_prod_waits_for_the_fill_before_rolling_the_deployment(rendered):
    prod = rendered("prod")
    job = captured(prod, ":Job")
    assert job.custom_timeouts == {"create": "14700s", "update": "14700s"}   # the deadline plus 5 minutes
    assert any(urn.endswith("PersistentVolumeClaim::llm-service-model-pvc") for urn in job.depends_on)
    deployment = captured(prod, ":Deployment", "llm-service-deployment")
    assert any(urn.endswith("batch/v1:Job::llm-service-fill") for urn in deployment.depends_on)


def test_prod_serving_pods_check_the_manifest_and_stay_offline(rendered):
    d = rendered("prod").one("Deployment", "llm-service")
    check = init_container(d)
    assert check["name"] == "model-check"
    assert check["command"][:4] == ["python", "-m", "serving.fetch", "--verify"]
    assert check["command"][-1] == f"/models/llama-3.1-8b/{SHA[:12]}"
    assert all(m["readOnly"] for m in check["volumeMounts"] if m["name"] == "model-storage")
    assert "HF_HUB_OFFLINE" not in {e["name"] for e in check["env"]}   # stays offline, as the image sets it
    assert not any(m["name"] == "source-credentials" for m in check["volumeMounts"])
    serving = pod(d)["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in serving["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["MODEL_PATH"] == f"/models/llama-3.1-8b/{SHA[:12]}"
    assert all(v["name"] != "source-credentials" for v in pod(d)["spec"]["volumes"])
    annotations = pod(d)["metadata"]["annotations"]
    assert annotations["llm-platform/model-revision"] == SHA
    assert FILL_LABEL not in pod(d)["metadata"]["labels"]


def test_a_new_revision_is_a_new_fill_and_a_new_pod_template(rendered):
    before = rendered("prod")
    after = render_values("prod", prod_with(source=f"hf://meta-llama/Llama-3.1-8B-Instruct@{OTHER_SHA}"))
    (job_before,), (job_after,) = before.of_kind("Job"), after.of_kind("Job")
    assert job_before["metadata"]["name"] != job_after["metadata"]["name"]
    t_before, t_after = pod(before.one("Deployment", "llm-service")), pod(after.one("Deployment", "llm-service"))
    assert t_after["metadata"]["annotations"]["llm-platform/model-revision"] == OTHER_SHA
    assert t_before["spec"]["containers"][0]["env"] != t_after["spec"]["containers"][0]["env"]   # MODEL_PATH


def test_prod_fill_egress_reaches_only_public_https(rendered):
    policy = rendered("prod").one("NetworkPolicy", "llm-service-fill-egress")["spec"]
    assert policy["podSelector"] == {"matchLabels": {FILL_LABEL: "llm-service"}}
    assert policy["policyTypes"] == ["Egress"]
    (rule,) = policy["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
    assert rule["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": NON_PUBLIC_IPV4}}]
    assert "169.254.0.0/16" in NON_PUBLIC_IPV4          # the cloud metadata endpoint stays out of reach
    # The serving pods' own egress is unchanged: no internet.
    serving = rendered("prod").one("NetworkPolicy", "llm-serving-egress")["spec"]
    assert all("ipBlock" not in peer for rule in serving["egress"] for peer in rule["to"])


def test_prod_model_claim_is_labelled_for_snapshots_and_keeps_its_identity(rendered):
    prod = rendered("prod")
    pvc = prod.one("PersistentVolumeClaim", "model-pvc")
    assert pvc["metadata"]["labels"][VOLUME_LABEL] == "llm-service"
    claim = captured(prod, ":PersistentVolumeClaim")
    assert claim.parent.endswith("llm-platform:index:ModelStorage::llm-service-storage")
    # It was a child of LLMServing before ModelStorage existed: the alias keeps the volume, never recreates it.
    assert claim.alias_parents == ["urn:pulumi:prod::llm-platform::llm-platform:index:LLMServing::llm-service"]


def test_prod_snapshot_schedule(rendered):
    schedule = rendered("prod").one("SnapshotSchedule")
    assert schedule["apiVersion"] == "snapscheduler.backube/v1"
    assert schedule["spec"] == {
        "claimSelector": {"matchLabels": {VOLUME_LABEL: "llm-service"}},
        "schedule": "0 3 * * *",
        "retention": {"maxCount": 7},
        "snapshotTemplate": {"snapshotClassName": "fast-ssd-snapshots", "labels": {VOLUME_LABEL: "llm-service"}},
    }
    assert not rendered("prod").of_kind("VolumeSnapshotClass")     # prod names an existing class


def test_plan_describes_source_fill_and_backups(rendered):
    plan = rendered("prod").outputs["capacityPlan"]["llm-service"]
    text = "\n".join(plan["summary"])
    assert f"@{SHA} (pinned) -> /models/llama-3.1-8b/{SHA[:12]}" in text
    assert "fills the volume before the pods roll" in text
    assert "backups: snapshots '0 3 * * *' with class fast-ssd-snapshots, keeping the newest 7" in text


# ------------------------------------------------------------------------------ staging: s3, dev: unpinned


def test_staging_s3_fill_uses_the_in_cluster_endpoint(rendered):
    staging = rendered("staging")
    (job,) = staging.of_kind("Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_ENDPOINT_URL_S3"] == "https://minio.model-storage.svc:9000"
    assert env["AWS_REGION"] == "us-east-1"
    assert container["command"][-2] == "s3://models/llama-3.1-8b-instruct/2024-07-23"
    assert container["command"][-1].startswith("/models/llama-3.1-8b/s3-")
    (rule,) = staging.one("NetworkPolicy", "llm-service-fill-egress")["spec"]["egress"]
    assert rule == {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "model-storage"}}}],
                    "ports": [{"protocol": "TCP", "port": 9000}]}


def test_dev_unpinned_source_is_allowed_and_called_out(rendered):
    dev = rendered("dev")
    assert dev.of_kind("Job")
    text = "\n".join(dev.outputs["capacityPlan"]["llm-service"]["summary"])
    assert "NOT pinned" in text


def test_unpinned_source_is_refused_for_prod():
    for uri in ("hf://meta-llama/Llama-3.1-8B-Instruct@main", "hf://meta-llama/Llama-3.1-8B-Instruct"):
        message = config_error("prod", prod_with(source=uri))
        assert message.startswith("stack 'prod': llm-platform:models[0].source: ")
        assert "branch or tag that can move" in message and "40-hex commit sha" in message
    # Any stack can ask for the same rule.
    values = stack_values("dev")
    values["requirePinnedSources"] = True
    assert "models[0].source" in config_error("dev", values)


# ------------------------------------------------------------------------------ statefulset: init container


def test_statefulset_volumes_are_filled_by_jobs_and_its_pods_never_reach_the_source(rendered):
    """The replicas' volumes are created ahead of the pods under the names the volumeClaimTemplates give (so the
    StatefulSet adopts them), each filled by its own Job; the serving pods only check the manifest, carry no fill
    label, and so get no egress to the source for their whole life."""
    example = rendered("examples/Pulumi.prod-statefulset.yaml")
    sts = example.one("StatefulSet")
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["labels"][VOLUME_LABEL] == "llm-service"
    claims = {c["metadata"]["name"]: c for c in example.of_kind("PersistentVolumeClaim")}
    assert sorted(claims) == sorted(f"model-data-llm-service-{i}" for i in range(10))    # maxReplicas 10
    assert all(c["spec"]["accessModes"] == ["ReadWriteOnce"] and c["metadata"]["labels"][VOLUME_LABEL] == "llm-service"
               for c in claims.values())
    jobs = {j["metadata"]["name"]: j for j in example.of_kind("Job")}
    assert len(jobs) == 10
    job = jobs["llm-service-fill-92c8bda1-3"]["spec"]["template"]
    assert job["metadata"]["labels"][FILL_LABEL] == "llm-service"
    assert next(v for v in job["spec"]["volumes"] if v["name"] == "model-data") == \
        {"name": "model-data", "persistentVolumeClaim": {"claimName": "model-data-llm-service-3"}}
    # Beside replica 3 (its ReadWriteOnce volume is attached there), on the GPU nodes.
    term = job["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"] == {"labelSelector": {"matchLabels": {
        "statefulset.kubernetes.io/pod-name": "llm-service-3"}}, "topologyKey": "kubernetes.io/hostname"}
    assert job["spec"]["nodeSelector"] == pod(sts)["spec"]["nodeSelector"]
    assert job["spec"]["tolerations"] == pod(sts)["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in job["spec"]["containers"][0]["resources"]["limits"]
    check = init_container(sts)
    assert check["name"] == "model-check" and "--verify" in check["command"]
    assert check["volumeMounts"][0] == {"name": "model-data", "mountPath": "/models", "readOnly": True}
    assert FILL_LABEL not in pod(sts)["metadata"]["labels"]
    assert not any(v["name"] == "source-credentials" for v in pod(sts)["spec"]["volumes"])
    policy = example.one("NetworkPolicy", "llm-service-fill-egress")
    assert policy["spec"]["podSelector"]["matchLabels"] == {FILL_LABEL: "llm-service"}
    # The StatefulSet rolls only once every replica volume holds the revision.
    fills = {r.name for r in example.resources if r.type.endswith(":Job")}
    statefulset = next(r for r in example.resources if r.type.endswith(":StatefulSet"))
    assert {urn.rsplit("::", 1)[1] for urn in statefulset.depends_on if ":Job::" in urn} == fills


def test_example_creates_its_snapshot_class_and_operator(rendered):
    example = rendered("examples/Pulumi.prod-statefulset.yaml")
    cls = example.one("VolumeSnapshotClass")
    assert cls == {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                   "metadata": {"name": "llm-model-snapshots",
                                "labels": {"app.kubernetes.io/part-of": "llm-platform",
                                           "app.kubernetes.io/managed-by": "pulumi"}},
                   "driver": "ebs.csi.aws.com", "deletionPolicy": "Retain"}
    (release,) = [r for r in example.helm_releases() if r["chart"] == "snapscheduler"]
    assert release["version"] == "3.4.0"
    assert example.one("SnapshotSchedule")["spec"]["retention"] == {"maxCount": 3, "expires": "168h"}


# ------------------------------------------------------------------------------------ pvc source, restore


def test_pvc_source_mounts_the_existing_claim_and_creates_none():
    result = render_values("prod", prod_with(source="pvc://shared-models/llama-3.1-8b", modelPath=None,
                                             fill={}))
    assert not result.of_kind("PersistentVolumeClaim") and not result.of_kind("Job")
    assert not [m for m in result.of_kind("NetworkPolicy") if m["metadata"]["name"].endswith("fill-egress")]
    assert not result.of_kind("SnapshotSchedule")            # not our claim to snapshot
    d = result.one("Deployment", "llm-service")
    volume = next(v for v in pod(d)["spec"]["volumes"] if v["name"] == "model-storage")
    assert volume["persistentVolumeClaim"]["claimName"] == "shared-models"
    env = {e["name"]: e.get("value") for e in pod(d)["spec"]["containers"][0]["env"]}
    assert env["MODEL_PATH"] == "/models/llama-3.1-8b"
    assert init_container(d)["command"][-3:] == ["--verify", "pvc://shared-models/llama-3.1-8b",
                                                  "/models/llama-3.1-8b"]


def test_restore_creates_a_new_claim_from_the_snapshot_and_rolls_onto_it():
    values = prod_with()
    values["models"][0]["storage"]["restoreFromSnapshot"] = "llm-service-model-volume-20261101"
    result = render_values("prod", values)
    (pvc,) = result.of_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "model-pvc-from-llm-service-model-volume-20261101"
    assert pvc["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                         "name": "llm-service-model-volume-20261101"}
    d = result.one("Deployment", "llm-service")
    volume = next(v for v in pod(d)["spec"]["volumes"] if v["name"] == "model-storage")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (job,) = result.of_kind("Job")             # the fill finds the restored manifest and has nothing to do
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    text = "\n".join(result.outputs["capacityPlan"]["llm-service"]["summary"])
    assert "created from VolumeSnapshot 'llm-service-model-volume-20261101'" in text


def test_statefulset_restore_gives_new_volume_claim_templates():
    spec = model_claim_spec(planned(dataclasses.replace(
        ModelConfig(name="m", served_model_name="m", model_path="/models/m", image="r/i:1", workload="statefulset"),
        storage=dataclasses.replace(ModelConfig.__dataclass_fields__["storage"].default_factory(),
                                    access_mode="ReadWriteOnce", restore_from_snapshot="snap-1"))))
    assert spec["accessModes"] == ["ReadWriteOnce"] and spec["dataSource"]["name"] == "snap-1"


# ---------------------------------------------------------------------------------------- pure builders


def test_fetch_container_hub_mirror_and_no_secret():
    model = planned(ModelConfig(name="m", served_model_name="m", model_path="/models/m/abc", image="r/i:1",
                                source=f"hf://o/n@{SHA}", fill=FillConfig(hf_endpoint="https://hub-mirror.internal")))
    container = fetch_container(model, fill=True)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_ENDPOINT"] == "https://hub-mirror.internal"
    assert "MODEL_SOURCE_CREDENTIALS_DIR" not in env
    assert [m["name"] for m in container["volumeMounts"]] == ["model-storage", "tmp"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "4Gi", "ephemeral-storage": "2Gi"}


def test_fill_egress_to_narrow_cidrs_has_no_exceptions():
    model = planned(ModelConfig(name="m", served_model_name="m", image="r/i:1", source="s3://b-1/p",
                                fill=FillConfig(egress_cidrs=["52.216.0.0/15"], egress_port=443)))
    (rule,) = fill_egress_policy_spec(model)["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "52.216.0.0/15"}}]


# ---------------------------------------------------------------------------------------- config guards


@pytest.mark.parametrize("changes, message", [
    ({"source": "ftp://models/llama"}, "models[0].source: 'ftp://models/llama' is not a model source; use hf://"),
    ({"source": "s3://models"}, "models[0].source: 's3://models': use s3://BUCKET/PREFIX"),
    ({"source": None, "modelPath": None}, "models[0].modelPath: is required without a source"),
    ({"source": "pvc://shared/llama", "modelPath": "/models/other"},
     "models[0].modelPath: '/models/other' does not match the source"),
    ({"source": "pvc://shared/llama", "workload": "statefulset", "storage": {"accessMode": "ReadWriteOnce"}},
     "models[0].source: a pvc:// source is one existing claim"),
    ({"runtime": "vllm", "image": None}, "models[0].fill.image: is required for runtime vllm"),
    ({"fill": {"image": "registry.example.com/llm-serving"}}, "models[0].fill.image: 'registry.example.com/llm-"
                                                              "serving' is not pinned"),
    ({"fill": {"s3Endpoint": "https://minio:9000"}}, "models[0].fill.s3Endpoint: is for s3:// sources"),
    ({"fill": {"hfEndpoint": "hub.internal"}}, "models[0].fill.hfEndpoint: 'hub.internal' is not a URL"),
    ({"fill": {"egressCidrs": ["everywhere"]}}, "models[0].fill.egressCidrs[0]: 'everywhere' is not a CIDR"),
    ({"fill": {"keepRevisions": 0}}, "models[0].fill.keepRevisions: 0 is below the minimum 1"),
    ({"fill": {"token": "hf_abc"}}, "models[0].fill.token: unknown key"),
    ({"storage": {"accessMode": "ReadOnlyMany"}}, "models[0].storage.accessMode: ReadOnlyMany cannot be written by "
                                                  "the fill Job"),
    ({"source": "pvc://shared/llama", "modelPath": None, "storage": {"restoreFromSnapshot": "snap"}},
     "models[0].storage.restoreFromSnapshot: the claim 'shared' of a pvc:// source is not managed here"),
])
def test_bad_model_storage_config_is_one_clear_error(changes, message):
    values = prod_with()
    model = values["models"][0]
    for key, value in changes.items():
        if isinstance(value, dict):
            model[key] = {**model.get(key, {}), **value}
        elif value is None:
            model.pop(key, None)
        else:
            model[key] = value
    assert config_error("prod", values).startswith(f"stack 'prod': llm-platform:{message}")


@pytest.mark.parametrize("backups, message", [
    ({"enabled": True, "schedule": "nightly"}, "backups.schedule: 'nightly' is not a cron schedule"),
    ({"enabled": True, "maxAge": "7d"}, "backups.maxAge: '7d' is not a duration"),
    ({"enabled": True, "retention": 0}, "backups.retention: 0 is below the minimum 1"),
    ({"enabled": True, "snapshotClass": {"deletionPolicy": "Keep"}}, "backups.snapshotClass.deletionPolicy"),
])
def test_bad_backups_config_is_one_clear_error(backups, message):
    values = prod_with()
    values["backups"] = backups
    assert config_error("prod", values).startswith(f"stack 'prod': llm-platform:{message}")


def test_quota_counts_no_claim_for_a_pvc_source():
    values = prod_with(source="pvc://shared-models/llama-3.1-8b", fill={})
    values["models"][0].pop("modelPath")
    values["guardrails"]["resourceQuota"]["persistentVolumeClaims"] = 0
    parse_stack_config("prod", values)                         # nothing to create, nothing to count
    values = prod_with()
    values["guardrails"]["resourceQuota"]["persistentVolumeClaims"] = 0
    assert "persistentVolumeClaims: 0 is below the 1 model volumes" in config_error("prod", values)


def test_checksums_are_required_in_prod_and_the_check_mode_reaches_both_fetches(rendered):
    """prod* fills fail on files they cannot check by a checksum; elsewhere such files are size-checked and recorded.
    The serving pods' check re-hashes the revision unless fill.verify says size-only."""
    prod, staging = rendered("prod"), rendered("staging")

    def env(container):
        return {e["name"]: e["value"] for e in container["env"]}

    def fill_env(result):
        (job,) = result.of_kind("Job")
        return env(job["spec"]["template"]["spec"]["containers"][0])

    assert fill_env(prod)["FILL_REQUIRE_CHECKSUMS"] == "true"
    assert fill_env(staging)["FILL_REQUIRE_CHECKSUMS"] == "false"
    assert fill_env(prod)["FILL_VERIFY_MODE"] == "full"
    assert env(init_container(prod.one("Deployment", "llm-service")))["FILL_VERIFY_MODE"] == "full"
    values = stack_values("staging")
    values["models"][0]["fill"].update(requireChecksums=True, verify="size-only")
    result = render_values("staging", values)
    assert fill_env(result)["FILL_REQUIRE_CHECKSUMS"] == "true"
    assert env(init_container(result.one("Deployment", "llm-service")))["FILL_VERIFY_MODE"] == "size-only"


def test_the_full_check_is_planned_into_the_rollout_deadline(rendered):
    """A full re-hash reads the whole model before the server starts: the Deployment's progress deadline covers the
    image pull, the check and the startup budget, and the plan says how long the check takes."""
    prod = rendered("prod")
    plan = prod.outputs["capacityPlan"]["llm-service"]
    assert round(plan["verify_estimate_seconds"]) == 64        # 16.06 GB of weights at 250 MB/s
    assert prod.one("Deployment", "llm-service")["spec"]["progressDeadlineSeconds"] == 665   # 300 + 64 + 300 pull
    values = stack_values("prod")
    values["models"][0]["fill"]["verify"] = "size-only"
    quick = render_values("prod", values)
    assert "verify_estimate_seconds" not in quick.outputs["capacityPlan"]["llm-service"]
    assert quick.one("Deployment", "llm-service")["spec"]["progressDeadlineSeconds"] == 600
