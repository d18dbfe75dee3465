"""checkov's Kubernetes checks over a folder of rendered YAML, offline, plus the rules for the skip file.

checkov cannot share an environment with the Pulumi SDK (checkov 3.3.30 pins packaging<24, pulumi 3.272
needs packaging>=26), so it runs as a command from its own virtualenv: `$CHECKOV_BIN`, else
`.venv-checkov/bin/checkov` at the repo root, else `checkov` on PATH. Skips live only in `.checkov.yaml`,
one commented reason per check; pod-security checks may never be skipped (fix the component instead).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from validation.findings import Finding
from validation.kube import WORKLOAD_KINDS
from validation.manifests import read_dir

LAYER = "checkov"
ROOT = Path(__file__).resolve().parent.parent
SKIP_FILE = ROOT / ".checkov.yaml"
INSTALL_HINT = ("python3 -m venv .venv-checkov && .venv-checkov/bin/pip install -r requirements-checkov.txt "
                "(or set CHECKOV_BIN to a checkov 3.3.30 executable)")

NEVER_SKIP = {
    "CKV_K8S_8": "liveness probe", "CKV_K8S_9": "readiness probe",
    "CKV_K8S_10": "CPU requests", "CKV_K8S_11": "CPU limits", "CKV_K8S_12": "memory requests",
    "CKV_K8S_13": "memory limits", "CKV_K8S_14": "image tag not latest", "CKV_K8S_16": "privileged",
    "CKV_K8S_17": "host PID", "CKV_K8S_18": "host IPC", "CKV_K8S_19": "host network",
    "CKV_K8S_20": "allowPrivilegeEscalation", "CKV_K8S_21": "default namespace",
    "CKV_K8S_22": "read-only root filesystem", "CKV_K8S_23": "root containers", "CKV_K8S_25": "added capabilities",
    "CKV_K8S_26": "hostPort", "CKV_K8S_27": "docker socket", "CKV_K8S_28": "NET_RAW",
    "CKV_K8S_29": "pod securityContext", "CKV_K8S_30": "container securityContext", "CKV_K8S_31": "seccomp",
    "CKV_K8S_35": "secrets as env", "CKV_K8S_37": "capabilities", "CKV_K8S_38": "service account token mount",
    "CKV_K8S_39": "CAP_SYS_ADMIN", "CKV_K8S_40": "high UID", "CKV_K8S_41": "default service account",
    "CKV2_K8S_6": "NetworkPolicy per pod",
}
"""Pod-security and hygiene findings on our own pods: these are fixed in components/, never skipped."""


HEADLESS_WORKER_CHECKS = {"CKV_K8S_8", "CKV_K8S_9"}
"""The one exception, in code because it is not a skip for any pod of ours that serves: a LeaderWorkerSet worker
runs vLLM headless (no HTTP server, no port to probe). Its liveness is its process (an exit restarts it, and
`RecreateGroupOnPodRestart` recreates the group) and the leader's probes (the leader's engine fails its health check
when a worker's pipeline stage dies). crossref `leaderworkerset-groups` fails the stack unless the leader of the
same LeaderWorkerSet has both probes and the group restarts as a whole, so the exception holds only where that is
true. Every other check, pod security included, applies to the worker templates."""


def lws_pod_templates(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A LeaderWorkerSet's leader and worker pod templates as core/v1 PodTemplates, so that checkov's pod policies
    (it has none for custom kinds) check them: `<name>-leader`, `<name>-worker`."""
    out = []
    for m in manifests:
        if m.get("kind") != "LeaderWorkerSet":
            continue
        group = (m.get("spec") or {}).get("leaderWorkerTemplate") or {}
        for role in ("leader", "worker"):
            template = group.get(f"{role}Template")
            if template:
                out.append({"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{m['metadata']['name']}-{role}",
                                         "namespace": m["metadata"].get("namespace", "default")},
                            "template": template})
    return out


class CheckovError(RuntimeError):
    """checkov is missing, crashed, or printed something that is not its JSON report."""


@dataclass
class CheckovReport:
    passed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    parsing_errors: list[str] = field(default_factory=list)
    resource_count: int = 0
    expected_workloads: set[str] = field(default_factory=set)
    """checkov resource ids (`Kind.namespace.name`) of the workloads in the scanned folder."""
    headless_workers: set[str] = field(default_factory=set)
    """checkov resource ids of LeaderWorkerSet worker templates (see `HEADLESS_WORKER_CHECKS`)."""

    def findings(self) -> list[Finding]:
        found = [Finding(LAYER, c["check_id"], c.get("resource", "?"), c.get("check_name", ""))
                 for c in self.failed
                 if not (c["check_id"] in HEADLESS_WORKER_CHECKS and c.get("resource") in self.headless_workers)]
        found += [Finding(LAYER, "parse", Path(p).name, "checkov could not parse this file")
                  for p in self.parsing_errors]
        if self.resource_count == 0:
            found.append(Finding(LAYER, "scan", "-", "checkov found no Kubernetes resources to check"))
        # checkov skips files it cannot load without a word; a workload it never checked must not pass.
        checked = {c.get("resource") for c in self.passed + self.failed + self.skipped}
        found += [Finding(LAYER, "scan", w, "checkov ran no check on this workload (did it fail to load the file?)")
                  for w in sorted(self.expected_workloads - checked)]
        return found

    def ids(self, section: str) -> set[tuple[str, str]]:
        """{(check id, resource)} of passed, failed or skipped results."""
        return {(c["check_id"], c.get("resource", "")) for c in getattr(self, section)}


def find_checkov() -> str:
    candidates = [os.environ.get("CHECKOV_BIN"), str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                  shutil.which("checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CheckovError(f"checkov is not installed: {INSTALL_HINT}")


def checkov_command(directory: Path, config_file: Path | None = SKIP_FILE, checkov: str | None = None) -> list[str]:
    command = [checkov or find_checkov(), "-d", str(directory), "--framework", "kubernetes", "--skip-download",
               "--output", "json", "--compact"]
    if config_file is not None:
        command += ["--config-file", str(config_file)]
    return command


def run_checkov(directory: Path, config_file: Path | None = SKIP_FILE, checkov: str | None = None,
                timeout: int = 300) -> CheckovReport:
    """Scan a folder of manifests. Runs in that folder so no ambient `.checkov.yaml` is picked up by accident."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    proc = subprocess.run(checkov_command(directory, config_file, checkov), cwd=directory, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 1):
        raise CheckovError(f"checkov exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise CheckovError(f"checkov did not print a JSON report ({exc}): {proc.stdout[:500]}{proc.stderr[-500:]}") \
            from exc
    report = parse_report(data)
    scanned = read_dir(directory)
    report.expected_workloads = {
        f"{m['kind']}.{(m.get('metadata') or {}).get('namespace', 'default')}.{m['metadata']['name']}"
        # checkov has no policies for custom kinds: a LeaderWorkerSet is checked through its PodTemplates.
        for m in scanned if (m.get("kind") in WORKLOAD_KINDS and m.get("kind") != "LeaderWorkerSet")
        or m.get("kind") == "PodTemplate"}
    report.headless_workers = {f"PodTemplate.{t['metadata']['namespace']}.{t['metadata']['name']}"
                               for t in lws_pod_templates(scanned) if t["metadata"]["name"].endswith("-worker")}
    return report


def parse_report(data: Any) -> CheckovReport:
    """checkov prints one object per framework (a list when several ran), or a bare summary when it found nothing."""
    reports = data if isinstance(data, list) else [data]
    report = CheckovReport()
    for item in reports:
        if item.get("check_type") not in (None, "kubernetes"):
            continue
        results = item.get("results") or {}
        report.passed += results.get("passed_checks") or []
        report.failed += results.get("failed_checks") or []
        report.skipped += results.get("skipped_checks") or []
        report.parsing_errors += results.get("parsing_errors") or []
        report.resource_count += (item.get("summary") or {}).get("resource_count", 0)
    return report


@dataclass(frozen=True)
class Skip:
    check_id: str
    reason: str


_ENTRY = re.compile(r"^\s*-\s*(CKV2?_K8S_\d+)\s*$")


def read_skips(path: Path = SKIP_FILE) -> list[Skip]:
    """The `skip-check` entries of the skip file, each with the comment block written directly above it."""
    skips: list[Skip] = []
    comment: list[str] = []
    in_list = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if re.match(r"^skip-check\s*:", line):
            in_list, comment = True, []
        elif in_list and stripped.startswith("#"):
            comment.append(stripped.lstrip("# ").strip())
        elif in_list and (entry := _ENTRY.match(line)):
            skips.append(Skip(entry.group(1), " ".join(comment).strip()))
            comment = []
        elif stripped and not line.startswith((" ", "\t", "-")):
            in_list = False
    return skips


def check_skip_file(path: Path = SKIP_FILE) -> list[Finding]:
    """Every skip has a reason naming its check, and no pod-security check is skipped."""
    findings = []
    for skip in read_skips(path):
        if not skip.reason.startswith(skip.check_id) or len(skip.reason) < len(skip.check_id) + 40:
            findings.append(Finding(LAYER, skip.check_id, path.name, "a skip needs a comment directly above it that "
                                                                    "starts with the check id and says why it does "
                                                                    "not apply"))
        if skip.check_id in NEVER_SKIP:
            findings.append(Finding(LAYER, skip.check_id, path.name, f"{NEVER_SKIP[skip.check_id]} is a pod-security "
                                                                    "check: fix the manifest, do not skip it"))
    return findings
