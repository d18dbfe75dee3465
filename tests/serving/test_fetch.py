"""`python -m serving.fetch`: fill a model volume from the hub or S3 (resume, checksums, manifest, atomic swap),
verify it, prune old revisions; every failure is one line and an exit code. Against a fake store on 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.fetch import MANIFEST_NAME, FetchError, fill, verify
from serving.fetch.__main__ import main
from serving.fetch.sources import RemoteFile, select_files
from tests.serving.fake_model_store import FakeModelStore
from tests.serving.server import REPO_ROOT, free_port

REPO = "org/tiny"
COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
BUCKET = "models"
PREFIX = "tiny/v1"
HF_PINNED = f"hf://{REPO}@{COMMIT}"
WEIGHTS = "model.safetensors"
DROP_AFTER = 100_000  # bytes of the weights sent before a dropped connection (the tiny model's are ~495 kB)
# In the repository but never needed to serve the model: excluded by default.
EXCLUDED = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
            "original/consolidated.pth": b"\x80\x02pickled" * 100,
            "original/params.json": b'{"dim": 64}',
            "pytorch_model.bin": b"\x80\x02pickled" * 100}


def fast_fill(source: str, dest: Path, **options):
    return fill(source, dest, retry_delay=0, **options)


@pytest.fixture(scope="module")
def model_files(tiny_model_dir) -> dict[str, bytes]:
    """The tiny model's real files (config, safetensors weights, tokenizer) plus a README."""
    files = {path.relative_to(tiny_model_dir).as_posix(): path.read_bytes()
             for path in sorted(tiny_model_dir.rglob("*")) if path.is_file()}
    assert len(files[WEIGHTS]) > 2 * DROP_AFTER
    return {**files, "README.md": b"# tiny\n"}


@pytest.fixture
def store(model_files, monkeypatch, tmp_path):
    with FakeModelStore() as fake:
        fake.add_commit(REPO, {**model_files, **EXCLUDED}, commit=COMMIT)
        fake.add_objects(BUCKET, {f"{PREFIX}/{path}": data for path, data in model_files.items()})
        # Shares the prefix's first characters: a listing of "tiny/v1" without the "/" would pick it up.
        fake.add_objects(BUCKET, {"tiny/v1-draft/config.json": b"{}"})
        fake.list_page_size = 3  # several ListObjectsV2 pages
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fake.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        yield fake


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "models" / "tiny" / COMMIT[:12]


def served_files(model_files) -> dict[str, bytes]:
    return {path: data for path, data in model_files.items() if path not in EXCLUDED}


def assert_holds(directory: Path, files: dict[str, bytes]) -> None:
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert on_disk == set(files) | {MANIFEST_NAME}
    for path, data in files.items():
        assert (directory / path).read_bytes() == data, path


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, [line for line in capsys.readouterr().err.splitlines() if line]


# --- 1, 2: clean fills ----------------------------------------------------------------------------------------------

def test_hf_fill_from_a_branch_records_the_commit_and_skips_duplicates(store, dest, model_files):
    result = fast_fill(f"hf://{REPO}@main", dest)

    expected = served_files(model_files)
    assert_holds(dest, expected)
    for excluded in EXCLUDED:
        assert not (dest / excluded).exists()
    manifest = manifest_of(dest)
    assert manifest["format"] == 1
    assert manifest["source"] == f"hf://{REPO}@main"
    assert manifest["revision"] == COMMIT == result.revision
    assert manifest["fetcher"] == "llm-platform serving.fetch"
    assert manifest["completedAt"].endswith("+00:00")
    assert manifest["files"] == [{"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                  "checkedAgainst": ["sha256" if path.endswith(".safetensors") else "git-sha1"]}
                                 for path, data in sorted(expected.items())]
    assert not dest.with_name(dest.name + ".partial").exists()
    # Downloads use the resolved commit, never the branch that could move meanwhile.
    downloads = [r.path for r in store.requests if "/resolve/" in r.path]
    assert downloads and all(f"/resolve/{COMMIT}/" in path for path in downloads)
    assert result.status == "filled" and result.bytes_downloaded == sum(map(len, expected.values()))


def test_filled_directory_is_a_loadable_model(store, dest):
    from safetensors import safe_open
    from transformers import AutoConfig

    fast_fill(HF_PINNED, dest)

    assert AutoConfig.from_pretrained(dest).model_type == "llama"
    with safe_open(dest / WEIGHTS, framework="pt") as weights:
        assert "model.embed_tokens.weight" in weights.keys()


def test_hf_token_is_sent_and_extra_excludes_apply(store, dest, monkeypatch, model_files):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fast_fill(HF_PINNED, dest, excludes=["README.*", "generation_config.json"])

    assert {r.authorization for r in store.requests} == {"Bearer hf_secret"}
    assert not (dest / "README.md").exists() and not (dest / "generation_config.json").exists()
    assert (dest / WEIGHTS).read_bytes() == model_files[WEIGHTS]


@pytest.mark.parametrize("prefix", [PREFIX, PREFIX + "/"])
def test_s3_fill_with_or_without_trailing_slash(store, dest, model_files, prefix):
    result = fast_fill(f"s3://{BUCKET}/{prefix}", dest)

    assert_holds(dest, model_files)  # and nothing from tiny/v1-draft
    assert manifest_of(dest)["revision"] == f"{BUCKET}/{PREFIX}" == result.revision
    gets = [r for r in store.requests if r.method == "GET" and "list-type" not in r.query]
    assert len(gets) == len(model_files)


def test_s3_kms_objects_skip_the_md5_check(store, dest, model_files):
    # SSE-KMS ETags are not MD5s of the content: checking them would fail every fill.
    store.add_objects(BUCKET, {f"tiny/kms/{path}": data for path, data in model_files.items()}, kms=True)
    fast_fill(f"s3://{BUCKET}/tiny/kms", dest)
    assert_holds(dest, model_files)


def test_select_files_keeps_pickles_only_without_safetensors():
    def listing(*paths):
        return [RemoteFile(path, 1, path) for path in paths]

    kept, excluded = select_files(listing("config.json", "pytorch_model.bin", "model.safetensors", "x.onnx"))
    assert [f.path for f in kept] == ["config.json", "model.safetensors"]
    assert excluded == ["pytorch_model.bin", "x.onnx"]
    kept, _ = select_files(listing("config.json", "pytorch_model.bin"))
    assert [f.path for f in kept] == ["config.json", "pytorch_model.bin"]


# --- 3, 4: resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, location", [(HF_PINNED, f"hf://{REPO}/{WEIGHTS}"),
                                              (f"s3://{BUCKET}/{PREFIX}", f"s3://{BUCKET}/{PREFIX}/{WEIGHTS}")])
def test_dropped_connection_resumes_with_a_range_request(store, dest, model_files, source, location):
    store.drop_connection(location, after=DROP_AFTER)

    fast_fill(source, dest)

    assert (dest / WEIGHTS).read_bytes() == model_files[WEIGHTS]
    assert store.ranges(location) == [None, f"bytes={DROP_AFTER}-"]


def test_exhausted_retries_leave_a_partial_file_that_the_next_run_resumes(store, dest, model_files):
    location = f"hf://{REPO}/{WEIGHTS}"
    store.drop_connection(location, after=DROP_AFTER, times=3)

    with pytest.raises(FetchError) as failure:
        fast_fill(HF_PINNED, dest, retries=2)

    assert failure.value.exit_code == 1
    assert f"{WEIGHTS}: download failed after 2 retries" in failure.value.message
    assert "run the fill again to resume" in failure.value.message
    assert not dest.exists()
    part = dest.with_name(dest.name + ".partial") / f"{WEIGHTS}.part"
    assert part.stat().st_size == 3 * DROP_AFTER  # each try added its bytes
    assert store.ranges(location) == [None, f"bytes={DROP_AFTER}-", f"bytes={2 * DROP_AFTER}-"]

    store.requests.clear()
    store.downloads.clear()
    fast_fill(HF_PINNED, dest)

    assert (dest / WEIGHTS).read_bytes() == model_files[WEIGHTS]
    assert store.ranges(location) == [f"bytes={3 * DROP_AFTER}-"]
    assert store.ranges(f"hf://{REPO}/config.json") == []  # finished files are re-verified, not re-downloaded


@pytest.mark.parametrize("stale_bytes, ignore_ranges, expected_ranges", [
    (DROP_AFTER, True, [f"bytes={DROP_AFTER}-"]),  # the server answers 200: the file restarts from zero
    (10 * DROP_AFTER, False, [None]),  # longer than the file: it cannot be a prefix of it
])
def test_partial_file_that_cannot_be_resumed_restarts_from_zero(store, dest, model_files, stale_bytes, ignore_ranges,
                                                                  expected_ranges):
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True)
    (partial / f"{WEIGHTS}.part").write_bytes(b"\xff" * stale_bytes)
    store.ignore_ranges = ignore_ranges

    fast_fill(HF_PINNED, dest)

    assert (dest / WEIGHTS).read_bytes() == model_files[WEIGHTS]
    assert store.ranges(f"hf://{REPO}/{WEIGHTS}") == expected_ranges


# --- 5: corruption --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, location, algorithm, expected", [
    (HF_PINNED, f"hf://{REPO}/{WEIGHTS}", "sha256", hashlib.sha256),
    (f"s3://{BUCKET}/{PREFIX}", f"s3://{BUCKET}/{PREFIX}/{WEIGHTS}", "md5", hashlib.md5),
])
def test_corrupted_weights_fail_naming_the_file_and_both_checksums(store, dest, model_files, source, location,
                                                                   algorithm, expected):
    store.corrupt(location)

    with pytest.raises(FetchError) as failure:
        fast_fill(source, dest)

    good = expected(model_files[WEIGHTS]).hexdigest()
    message = failure.value.message
    assert failure.value.exit_code == 1
    assert f"{WEIGHTS}: {algorithm} mismatch: expected {good}, got " in message
    actual = message.split(", got ")[1].split(";")[0]
    assert len(actual) == len(good) and actual != good
    assert "the source changed or the transfer was corrupted; run the fill again" in message
    assert not dest.exists()
    assert not (dest.with_name(dest.name + ".partial") / f"{WEIGHTS}.part").exists()


def test_corrupted_small_file_fails_its_git_blob_check(store, dest):
    store.corrupt(f"hf://{REPO}/tokenizer.json")
    with pytest.raises(FetchError, match=r"tokenizer.json: git-sha1 mismatch: expected [0-9a-f]{40}, got [0-9a-f]{40}"):
        fast_fill(HF_PINNED, dest)


# --- 6: pinning ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, moving", [(f"hf://{REPO}@main", "revision 'main' is a branch or tag and can move"),
                                            (f"hf://{REPO}", "no revision means 'main', a branch that can move")])
def test_unpinned_source_is_refused_before_any_request(store, dest, capsys, source, moving):
    with pytest.raises(FetchError) as failure:
        fast_fill(source, dest, require_pinned=True)
    assert failure.value.exit_code == 2
    assert failure.value.message == (f"{source}: {moving}; pin the commit: hf://{REPO}@<40-hex sha> (see the "
                                     "model's commit history on the hub)")

    code, stderr = run_main(capsys, "--require-pinned", source, str(dest))
    assert (code, stderr) == (2, [f"serving.fetch: {failure.value.message}"])
    assert store.requests == []
    assert not dest.parent.exists()


def test_pinned_commit_is_accepted_with_require_pinned(store, dest, model_files):
    assert fast_fill(HF_PINNED, dest, require_pinned=True).status == "filled"
    assert_holds(dest, served_files(model_files))


# --- 7: idempotence and replacement ----------------------------------------------------------------------------------

def test_already_filled_volume_makes_no_request(store, dest):
    fast_fill(HF_PINNED, dest)
    store.requests.clear()

    result = fast_fill(HF_PINNED, dest)

    assert result.status == "already-filled" and result.revision == COMMIT
    assert store.requests == []


def test_already_filled_from_a_branch_only_checks_where_it_points(store, dest, model_files):
    fast_fill(f"hf://{REPO}@main", dest)
    store.requests.clear()
    assert fast_fill(f"hf://{REPO}", dest).status == "already-filled"  # no revision is main
    assert [r.path for r in store.requests] == [f"/api/models/{REPO}/revision/main"]

    moved = store.add_commit(REPO, {**model_files, "README.md": b"# tiny, v2\n"})
    result = fast_fill(f"hf://{REPO}@main", dest)

    assert result.status == "filled" and result.revision == moved == manifest_of(dest)["revision"]
    assert (dest / "README.md").read_bytes() == b"# tiny, v2\n"


def test_fill_of_another_source_replaces_the_directory_atomically(store, dest, model_files):
    fast_fill(f"s3://{BUCKET}/{PREFIX}", dest)
    (dest / "stray.txt").write_text("left over by the old fill")

    result = fast_fill(HF_PINNED, dest)

    assert result.status == "filled"
    assert_holds(dest, served_files(model_files))  # stray.txt went with the old directory
    assert manifest_of(dest)["source"] == HF_PINNED
    # No .partial, no .replaced-*: only the directory and its fill lock.
    assert sorted(p.name for p in dest.parent.iterdir()) == [f".{dest.name}.lock", dest.name]


def test_incomplete_fill_is_refilled(store, dest, model_files):
    fast_fill(HF_PINNED, dest)
    (dest / WEIGHTS).write_bytes(b"truncated")

    assert fast_fill(HF_PINNED, dest).status == "filled"
    assert (dest / WEIGHTS).read_bytes() == model_files[WEIGHTS]


def test_concurrent_fills_of_one_directory_take_turns(store, dest, model_files, caplog):
    """A Job's next pod can start while the last one still terminates: the second fill waits for the first's lock
    (held here from another open file, as another pod would) and only then fills."""
    import fcntl
    import threading
    import time

    held, release = threading.Event(), threading.Event()
    dest.parent.mkdir(parents=True)

    def other_fill():  # holds the lock the way a running fill does, from another open file
        with open(dest.with_name(f".{dest.name}.lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write("fill-pod-1 pid 7\n")
            handle.flush()
            held.set()
            release.wait(10)
            fcntl.flock(handle, fcntl.LOCK_UN)

    first = threading.Thread(target=other_fill)
    first.start()
    assert held.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        result = fast_fill(HF_PINNED, dest)
    first.join(10)
    assert time.monotonic() - started >= 0.3
    assert "another fill of this directory is running (fill-pod-1 pid 7): waiting" in caplog.text
    assert result.status == "filled"
    assert_holds(dest, served_files(model_files))


# --- 8: verify -------------------------------------------------------------------------------------------------------

def test_verify_accepts_a_complete_fill(store, dest, capsys):
    fast_fill(HF_PINNED, dest)
    store.requests.clear()

    assert verify(HF_PINNED, dest).status == "verified"
    code, stderr = run_main(capsys, "--verify", HF_PINNED, str(dest))
    assert code == 0 and "complete fill of" in stderr[-1]
    assert store.requests == []


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / MANIFEST_NAME).unlink(), f"no manifest: the fill for {HF_PINNED} has not completed; check the "
                                             "model's fill Job logs"),
    (lambda d: (d / WEIGHTS).unlink(), f"incomplete model for {HF_PINNED}: {WEIGHTS} is missing; run the model's "
                                       "fill Job again to repair it"),
    (lambda d: (d / "config.json").write_text("{}"), "config.json is 2 bytes, the manifest says"),
    (lambda d: d.rename(d.with_name("gone")), "does not exist: the fill for"),
])
def test_verify_names_what_is_wrong(store, dest, capsys, damage, problem):
    fast_fill(HF_PINNED, dest)
    damage(dest)

    with pytest.raises(FetchError) as failure:
        verify(HF_PINNED, dest)
    assert failure.value.exit_code == 1 and problem in failure.value.message

    code, stderr = run_main(capsys, "--verify", HF_PINNED, str(dest))
    assert code == 1 and len(stderr) == 1 and problem in stderr[0]


def overwrite_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_rehashes_and_catches_a_same_size_overwrite(store, dest, capsys, monkeypatch):
    fast_fill(HF_PINNED, dest)
    overwrite_same_size(dest / WEIGHTS)
    store.requests.clear()

    code, stderr = run_main(capsys, "--verify", HF_PINNED, str(dest))
    assert code == 1 and len(stderr) == 1
    assert re.fullmatch(rf"serving.fetch: {dest}: incomplete model for {re.escape(HF_PINNED)}: {WEIGHTS} has changed "
                        r"since the fill: sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64}; run the model's fill "
                        r"Job again to repair it", stderr[0]), stderr[0]
    # The fast mode checks sizes only, so it cannot see this; from the flag or from the environment.
    code, stderr = run_main(capsys, "--verify", "--verify-mode", "size-only", HF_PINNED, str(dest))
    assert code == 0 and "sizes only, not re-hashed" in stderr[-1]
    monkeypatch.setenv("FILL_VERIFY_MODE", "size-only")
    assert run_main(capsys, "--verify", HF_PINNED, str(dest))[0] == 0
    assert run_main(capsys, "--verify", "--verify-mode", "full", HF_PINNED, str(dest))[0] == 1  # the flag wins
    assert store.requests == []  # verification never reaches the source


def test_refill_rehashes_a_matching_manifest_instead_of_trusting_it(store, dest, model_files, caplog):
    fast_fill(HF_PINNED, dest)
    overwrite_same_size(dest / WEIGHTS)

    assert fast_fill(HF_PINNED, dest, verify_mode="size-only").status == "already-filled"  # what size-only trusts
    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        result = fast_fill(HF_PINNED, dest)

    assert result.status == "filled"
    assert f"{WEIGHTS} has changed since the fill" in caplog.text and "refilling" in caplog.text
    assert_holds(dest, served_files(model_files))
    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        assert fast_fill(HF_PINNED, dest).status == "already-filled"  # intact again: kept, and re-hashed to know it
    assert re.search(rf"{dest}: re-hashed {len(served_files(model_files))} files, [\d.]+ GB in [\d.]+ s", caplog.text)


@pytest.mark.parametrize("name, value, problem", [
    ("FILL_VERIFY_MODE", "quick", "FILL_VERIFY_MODE='quick' is not one of full, size-only; fix the environment, or "
                                  "pass --verify-mode"),
    ("FILL_REQUIRE_CHECKSUMS", "prod", "FILL_REQUIRE_CHECKSUMS='prod' is not one of 1, true, yes, 0, false, no; fix "
                                       "the environment, or pass --require-checksums"),
])
def test_bad_option_in_the_environment_is_a_usage_error(store, dest, capsys, monkeypatch, name, value, problem):
    monkeypatch.setenv(name, value)
    assert run_main(capsys, HF_PINNED, str(dest)) == (2, [f"serving.fetch: {problem}"])
    assert store.requests == []


def test_verify_refuses_a_fill_of_another_source(store, dest):
    fast_fill(f"s3://{BUCKET}/{PREFIX}", dest)
    with pytest.raises(FetchError, match=rf"holds s3://{BUCKET}/{PREFIX}, not {HF_PINNED}; point the deployment at"):
        verify(HF_PINNED, dest)
    assert verify(f"s3://{BUCKET}/{PREFIX}/", dest).status == "verified"  # the same prefix


def test_pvc_source_verifies_without_network(store, dest, tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "pvc" / "llama"))
    assert fast_fill("pvc://models/llama", copy).status == "verified"  # fill = verify for a model on a volume

    (copy / "model-00002.safetensors.part").write_bytes(b"half")
    with pytest.raises(FetchError, match="model-00002.safetensors.part is a partial download"):
        verify("pvc://models/llama", copy)
    (copy / "model-00002.safetensors.part").unlink()
    (copy / WEIGHTS).unlink()
    with pytest.raises(FetchError, match=r"no \*.safetensors weights in pvc://models/llama"):
        verify("pvc://models/llama", copy)

    fast_fill(HF_PINNED, dest)  # a fill of ours, on the volume the claim mounts: any source will do
    assert verify("pvc://models/tiny", dest).revision == COMMIT
    (dest / WEIGHTS).unlink()
    with pytest.raises(FetchError, match=f"{WEIGHTS} is missing"):
        verify("pvc://models/tiny", dest)


# --- 9: pruning ------------------------------------------------------------------------------------------------------

def test_keep_revisions_prunes_the_oldest_fills_and_keeps_dest(store, tmp_path, model_files):
    model_dir = tmp_path / "models" / "tiny"
    for version in ("v2", "v3"):
        store.add_objects(BUCKET, {f"tiny/{version}/{path}": data for path, data in model_files.items()})
    (model_dir / "notes").mkdir(parents=True)  # not a fill: never touched
    (model_dir / "v0.replaced-20240101T000000000000Z").mkdir()  # leftover of an interrupted swap
    fast_fill(f"s3://{BUCKET}/tiny/v1", model_dir / "v1")
    fast_fill(f"s3://{BUCKET}/tiny/v2", model_dir / "v2")

    result = fast_fill(f"s3://{BUCKET}/tiny/v3", model_dir / "v3", keep_revisions=2)

    # v1 and its fill lock are gone; the kept fills keep theirs.
    assert sorted(p.name for p in model_dir.iterdir()) == [".v2.lock", ".v3.lock", "notes", "v2", "v3"]
    assert result.pruned and all(not path.exists() for path in result.pruned)
    # DEST stays even when it is the oldest fill (a rollback to an older revision).
    fast_fill(f"s3://{BUCKET}/tiny/v1", model_dir / "v1")
    assert fast_fill(f"s3://{BUCKET}/tiny/v1", model_dir / "v1", keep_revisions=2).status == "already-filled"
    assert sorted(p.name for p in model_dir.iterdir()) == [".v1.lock", ".v3.lock", "notes", "v1", "v3"]


@pytest.mark.parametrize("other_source", ["hf", "s3"])
def test_pruning_leaves_another_models_fills_alone(store, tmp_path, model_files, caplog, other_source):
    """Two models given one claim and modelPath: one model's fill must not prune the other's live directory."""
    model_dir = tmp_path / "models" / "shared"
    store.add_objects(BUCKET, {f"other/v1/{path}": data for path, data in model_files.items()})
    store.add_objects(BUCKET, {f"tiny/v2/{path}": data for path, data in model_files.items()})
    other = model_dir / "other-model"
    fast_fill(f"s3://{BUCKET}/other/v1" if other_source == "s3" else HF_PINNED, other)
    fast_fill(f"s3://{BUCKET}/tiny/v1", model_dir / "v1")

    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        result = fast_fill(f"s3://{BUCKET}/tiny/v2", model_dir / "v2", keep_revisions=1)

    assert result.pruned == (model_dir / "v1",)  # the same model's older revision goes
    assert other.is_dir() and verify(manifest_of(other)["source"], other).status == "verified"
    assert f"not pruning {other}: it holds {manifest_of(other)['source']}, not a revision of s3://{BUCKET}/tiny/v2's " \
           "model (give each model its own modelPath)" in caplog.text


# --- 10: bad sources -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["http://example.com/model", "hf://onlyorg", "hf://org/name@", "hf://org/a/b",
                                    "s3://bucket", "s3://bucket/", "pvc://", "gs://bucket/model", "",
                                    "pvc://claim/../etc"])
def test_malformed_source_is_a_usage_error_listing_the_accepted_forms(store, dest, capsys, source):
    code, stderr = run_main(capsys, source, str(dest))
    assert code == 2
    assert stderr == [f"serving.fetch: {source!r} is not a model source; use hf://ORG/NAME[@REVISION], "
                      "s3://BUCKET/PREFIX or pvc://CLAIM[/PATH]"]
    assert store.requests == []


@pytest.mark.parametrize("source, message", [
    ("hf://org/missing", "hf://org/missing: repository org/missing not found on http://127.0.0.1:"),
    (f"hf://{REPO}@v9", f"hf://{REPO}@v9: revision 'v9' not found in {REPO} on http://127.0.0.1:"),
    (f"s3://{BUCKET}/nothing/here", f"no objects under s3://{BUCKET}/nothing/here/; check the bucket and prefix"),
    ("s3://other-bucket/tiny", "s3://other-bucket/tiny: bucket other-bucket does not exist on http://127.0.0.1:"),
])
def test_unknown_model_fails_with_one_clear_line(store, dest, capsys, source, message):
    code, stderr = run_main(capsys, source, str(dest))
    assert code == 1
    assert len(stderr) == 1 and stderr[0].startswith(f"serving.fetch: {message}")
    assert not dest.exists()


def test_unreachable_hub_is_retried_then_named(store, dest, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(FetchError) as failure:
        fast_fill(HF_PINNED, dest, retries=1)
    message = failure.value.message
    assert failure.value.exit_code == 1
    assert message.startswith(f"listing {HF_PINNED} failed after 1 retries: cannot reach http://127.0.0.1:")
    assert message.endswith("check the network path to the source, then run the fill again")


def test_bad_options_are_one_usage_line(capsys, dest):
    code, stderr = run_main(capsys, "--keep-revisions", "-1", HF_PINNED, str(dest))
    assert code == 2 and len(stderr) == 1
    assert stderr[0].startswith("serving.fetch: argument --keep-revisions: must be 0 or more, got -1 (usage: ")


# --- 10b: credentials from the fill's Secret ------------------------------------------------------------------------

GATED = "org/gated"
GATED_PINNED = f"hf://{GATED}@{COMMIT}"
SECRET_HINT = "the Secret named by models[].fill.secretName"


@pytest.fixture
def secret_dir(tmp_path, monkeypatch) -> Path:
    """The fill's Secret as the kubelet mounts it: one file per key (here still empty), named by the env var."""
    directory = tmp_path / "secret"
    directory.mkdir()
    monkeypatch.setenv("MODEL_SOURCE_CREDENTIALS_DIR", str(directory))
    return directory


def test_token_from_the_mounted_secret_opens_a_gated_repo(store, dest, model_files, secret_dir, monkeypatch):
    store.add_commit(GATED, model_files, commit=COMMIT, token="hf_from_secret")
    (secret_dir / "HF_TOKEN").write_text("hf_from_secret\n")  # kubectl create secret --from-file keeps the newline
    monkeypatch.setenv("HF_TOKEN", "hf_stale_env")  # the mounted Secret wins over the environment

    fast_fill(GATED_PINNED, dest)

    assert_holds(dest, model_files)
    hub = [r for r in store.requests if not r.path.startswith("/cdn/")]
    assert hub and {r.authorization for r in hub} == {"Bearer hf_from_secret"}


def test_gated_repo_without_a_token_names_the_secret_key(store, dest, model_files, secret_dir, capsys):
    store.add_commit(GATED, model_files, commit=COMMIT, token="hf_from_secret")
    code, stderr = run_main(capsys, GATED_PINNED, str(dest))  # the Secret is optional: mounted but without keys
    assert code == 1 and len(stderr) == 1
    assert stderr[0] == (f"serving.fetch: {GATED_PINNED}: {GATED} is gated on {store.url}: no HF_TOKEN was given: "
                         f"add the key HF_TOKEN to {SECRET_HINT} (mounted at {secret_dir}), from an account that "
                         "accepted the model's licence on the hub")
    assert not dest.exists()


def test_refused_token_says_where_it_came_from(store, dest, model_files, secret_dir, capsys):
    store.add_commit(GATED, model_files, commit=COMMIT, token="hf_from_secret")
    (secret_dir / "HF_TOKEN").write_text("hf_other_account")
    code, stderr = run_main(capsys, GATED_PINNED, str(dest))
    assert code == 1
    assert f"HF_TOKEN from {secret_dir / 'HF_TOKEN'} was refused: accept the model's licence" in stderr[0]


def test_s3_keys_from_the_mounted_secret(store, dest, model_files, secret_dir, capsys):
    store.access_key_id = "fill-key"
    source = f"s3://{BUCKET}/{PREFIX}"
    code, stderr = run_main(capsys, source, str(dest))  # the environment's test-key is not accepted
    assert code == 1
    assert stderr[0] == (f"serving.fetch: s3://{BUCKET}/{PREFIX}: access denied (InvalidAccessKeyId) with "
                         "AWS_ACCESS_KEY_ID from the environment; check the key pair and that it may list and read "
                         "the bucket")

    (secret_dir / "AWS_ACCESS_KEY_ID").write_text("fill-key")
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text("fill-secret")
    fast_fill(source, dest)
    assert_holds(dest, model_files)
    signed = [r.authorization for r in store.requests if r.authorization]
    assert signed and all("Credential=fill-key/" in header for header in signed[-len(model_files):])


def test_s3_without_any_credentials_says_which_keys_to_add(store, dest, secret_dir, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    code, stderr = run_main(capsys, f"s3://{BUCKET}/{PREFIX}", str(dest))
    assert code == 1 and len(stderr) == 1
    assert stderr[0] == (f"serving.fetch: s3://{BUCKET}/{PREFIX}: no AWS credentials: add the keys AWS_ACCESS_KEY_ID "
                         f"and AWS_SECRET_ACCESS_KEY to {SECRET_HINT} (mounted at {secret_dir}), or give the fill's "
                         "service account a role that can read the bucket")


@pytest.mark.parametrize("files, problem", [
    ({"HF_TOKEN": "  \n"}, "HF_TOKEN is empty; put the value of HF_TOKEN in " + SECRET_HINT),
    ({"AWS_ACCESS_KEY_ID": "fill-key"}, "AWS_ACCESS_KEY_ID from {dir}/AWS_ACCESS_KEY_ID but no AWS_SECRET_ACCESS_KEY: "
                                        "S3 needs both keys; add the key AWS_SECRET_ACCESS_KEY to " + SECRET_HINT),
])
def test_unusable_secret_is_a_usage_error(store, dest, secret_dir, monkeypatch, capsys, files, problem):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name, text in files.items():
        (secret_dir / name).write_text(text)
    source = HF_PINNED if "HF_TOKEN" in files else f"s3://{BUCKET}/{PREFIX}"
    code, stderr = run_main(capsys, source, str(dest))
    assert code == 2 and len(stderr) == 1
    assert problem.format(dir=secret_dir) in stderr[0]
    assert not store.downloads


# --- 11: the real CLI ------------------------------------------------------------------------------------------------

def test_cli_end_to_end_in_the_serving_images_environment(store, dest, model_files):
    # The serving image sets HF_HUB_OFFLINE=1 for the server; the fetcher, from the same image, must still fetch.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    store.drop_connection(f"hf://{REPO}/{WEIGHTS}", after=DROP_AFTER)

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving.fetch", *argv], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    filled = run("--require-pinned", "--keep-revisions", "1", HF_PINNED, str(dest))
    assert filled.returncode == 0, filled.stderr
    assert filled.stdout == ""
    lines = filled.stderr.splitlines()
    assert all(line.startswith("serving.fetch: ") for line in lines)
    assert any(f"{WEIGHTS}: connection lost" in line and f"from byte {DROP_AFTER}" in line for line in lines)
    assert any(line.startswith(f"serving.fetch: {WEIGHTS}: done, ") and "MB/s" in line for line in lines)
    assert re.fullmatch(rf"serving.fetch: {dest}: filled from {HF_PINNED} \(revision {COMMIT}\): "
                        rf"{len(served_files(model_files))} files, [\d.]+ kB downloaded", lines[-1]), lines[-1]
    assert_holds(dest, served_files(model_files))

    again = run(HF_PINNED, str(dest))
    assert again.returncode == 0 and "already filled" in again.stderr

    wrong = run("--verify", f"s3://{BUCKET}/{PREFIX}", str(dest))
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines() == [f"serving.fetch: {dest}: holds {HF_PINNED}, not s3://{BUCKET}/{PREFIX}; "
                                         f"point the deployment at the directory filled from s3://{BUCKET}/{PREFIX}, "
                                         "or run its fill Job"]


def test_fetcher_stays_light():
    probe = ("import sys, serving.fetch.__main__, serving.fetch.hub, serving.fetch.s3; "
             "heavy = {'torch', 'transformers', 'fastapi', 'uvicorn', 'serving.app', 'serving.engine'}; "
             "print(sorted(heavy & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr


# --- 12: symlinks on the volume (issue 22) ---------------------------------------------------------------------------

@pytest.mark.parametrize("planted", ["partial", "part", "lock"])
def test_symlinks_on_the_volume_are_refused_not_followed(store, dest, tmp_path, planted):
    """A symlinked `DEST.partial`, `*.part` or lock file would have the fill write outside the model directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"not the fill's")
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True)
    if planted == "partial":
        partial.symlink_to(outside, target_is_directory=True)
        link = partial
    elif planted == "part":
        partial.mkdir()
        link = partial / f"{WEIGHTS}.part"
        link.symlink_to(victim)
    else:
        link = dest.with_name(f".{dest.name}.lock")
        link.symlink_to(victim)

    with pytest.raises(FetchError) as failure:
        fast_fill(HF_PINNED, dest)

    assert failure.value.exit_code == 1
    assert failure.value.message == (f"{link}: is a symlink; the fill never makes symlinks, so something else put it "
                                     "on the model volume: remove it (and find out what wrote it), then run the fill "
                                     "again")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"] and victim.read_bytes() == b"not the fill's"
    assert not dest.exists()


def test_symlinked_directory_inside_the_partial_fill_is_refused(store, dest, tmp_path, model_files):
    store.add_objects(BUCKET, {f"tiny/nested/{path}": data for path, data in model_files.items()})
    store.add_objects(BUCKET, {"tiny/nested/extra/notes.json": b"{}"})
    outside = tmp_path / "outside"
    outside.mkdir()
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True)
    (partial / "extra").symlink_to(outside, target_is_directory=True)

    with pytest.raises(FetchError, match=re.escape(f"{partial / 'extra'}: is a symlink; the fill never makes")):
        fast_fill(f"s3://{BUCKET}/tiny/nested", dest)
    assert list(outside.iterdir()) == []


def test_verify_refuses_a_symlink_in_place_of_a_filled_file(store, dest, tmp_path):
    fast_fill(HF_PINNED, dest)
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes((dest / WEIGHTS).read_bytes())  # the same bytes, but not on the model's directory
    (dest / WEIGHTS).unlink()
    (dest / WEIGHTS).symlink_to(copy)

    with pytest.raises(FetchError, match=f"{WEIGHTS} is a symlink, not a file the fill wrote; run the model's fill"):
        verify(HF_PINNED, dest)
    assert fast_fill(HF_PINNED, dest).status == "filled"  # a refill repairs it
    assert not (dest / WEIGHTS).is_symlink()


# --- 13: S3 multipart uploads and checksums (issue 22) ---------------------------------------------------------------

PART_SIZE = 200_000  # the weights (~495 kB) upload in 3 parts, with a multipart ETag that is no MD5 of them
try:
    import awscrt  # noqa: F401  (CRC32C and CRC64NVME)
    HAS_CRT = True
except ImportError:
    HAS_CRT = False
needs_crt = pytest.mark.skipif(not HAS_CRT, reason="CRC32C and CRC64NVME need awscrt (serving/requirements.txt)")


def multipart_model(store, model_files, prefix: str, **options) -> str:
    store.add_objects(BUCKET, {f"{prefix}/{path}": data for path, data in model_files.items()},
                      part_size=PART_SIZE, **options)
    return f"s3://{BUCKET}/{prefix}"


def publish_sums(store, model_files, prefix: str, lines: str | None = None) -> None:
    lines = lines if lines is not None else "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n"
                                                    for path, data in sorted(model_files.items()))
    store.add_objects(BUCKET, {f"{prefix}/SHA256SUMS": lines.encode()})


@pytest.mark.parametrize("checksum, full_object, check", [
    ("sha256", False, "s3-sha256"),
    ("crc32", False, "s3-crc32"),
    ("crc32", True, "s3-crc32"),
    ("sha1", True, "s3-sha1"),
    ("sha512", False, "s3-sha512"),
    ("md5", True, "s3-md5"),
    pytest.param("crc32c", False, "s3-crc32c", marks=needs_crt),
    pytest.param("crc64nvme", True, "s3-crc64nvme", marks=needs_crt),  # what S3 adds when the upload sent none
    (None, False, "SHA256SUMS"),
])
def test_corrupted_multipart_object_fails_its_s3_checksum(store, dest, model_files, checksum, full_object, check):
    """A multipart ETag is no digest of the content, so a corrupted multipart object used to be reported filled."""
    source = multipart_model(store, model_files, "tiny/mp", checksum=checksum, full_object=full_object)
    if checksum is None:
        publish_sums(store, model_files, "tiny/mp")
    store.corrupt(f"s3://{BUCKET}/tiny/mp/{WEIGHTS}")

    with pytest.raises(FetchError) as failure:
        fast_fill(source, dest, require_checksums=True)

    assert failure.value.exit_code == 1
    assert f"{WEIGHTS}: {check} mismatch: expected " in failure.value.message
    assert not dest.exists()

    store._faults.clear()
    result = fast_fill(source, dest, require_checksums=True)
    assert result.status == "filled" and result.size_only == ()
    assert_holds(dest, model_files)  # SHA256SUMS is read, not copied into the model
    assert {entry["path"]: entry["checkedAgainst"] for entry in manifest_of(dest)["files"]}[WEIGHTS] == [check]


def test_multipart_checksum_survives_a_resumed_download(store, dest, model_files):
    """S3 sends no checksum with a Range answer: the composite check runs over the resumed file as a whole."""
    source = multipart_model(store, model_files, "tiny/mp", checksum="sha256")
    store.parts_page_size = 2  # GetObjectAttributes pages through the parts
    location = f"s3://{BUCKET}/tiny/mp/{WEIGHTS}"
    store.drop_connection(location, after=PART_SIZE + 1234)

    fast_fill(source, dest)

    assert store.ranges(location) == [None, f"bytes={PART_SIZE + 1234}-"]
    assert_holds(dest, model_files)
    assert {e["path"]: e["checkedAgainst"] for e in manifest_of(dest)["files"]}[WEIGHTS] == ["s3-sha256"]


def test_multipart_object_without_checksums_is_size_only_or_refused(store, dest, model_files, capsys, monkeypatch,
                                                                      caplog):
    source = multipart_model(store, model_files, "tiny/mp")
    large = sorted(path for path, data in model_files.items() if len(data) > PART_SIZE)
    assert large == [WEIGHTS]

    # Required (as prod does): refused before any byte is downloaded, from the flag or from the environment.
    message = (f"serving.fetch: {source}: {WEIGHTS} has no checksum this fill can check, only a size (checksums "
               "are required: --require-checksums or FILL_REQUIRE_CHECKSUMS); publish a SHA256SUMS file under "
               f"{source}/ (`sha256sum` output for every file), or upload the files with an S3 checksum "
               "(--checksum-algorithm SHA256 or CRC32)")
    assert run_main(capsys, "--require-checksums", source, str(dest)) == (2, [message])
    monkeypatch.setenv("FILL_REQUIRE_CHECKSUMS", "true")
    assert run_main(capsys, source, str(dest)) == (2, [message])
    assert not store.downloads and not dest.exists()

    # Not required: filled, and recorded and reported as checked by size only.
    monkeypatch.delenv("FILL_REQUIRE_CHECKSUMS")
    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        result = fast_fill(source, dest)
    assert result.status == "filled" and result.size_only == (WEIGHTS,)
    checked = {entry["path"]: entry["checkedAgainst"] for entry in manifest_of(dest)["files"]}
    assert checked[WEIGHTS] == [] and checked["config.json"] == ["md5"]  # small files: single-part MD5 ETags
    assert f"{source}: 1 files have no checksum this fill can check, only their size ({WEIGHTS})" in caplog.text
    assert f"1 checked by size only ({WEIGHTS})" in caplog.text

    # Checksums required later: the size-only fill is not trusted; the source is asked again, and still refused.
    assert run_main(capsys, "--require-checksums", source, str(dest))[0] == 2
    publish_sums(store, model_files, "tiny/mp")
    result = fast_fill(source, dest, require_checksums=True)
    assert result.status == "filled" and result.size_only == ()


def test_composite_checksum_without_part_sizes_does_not_apply(store, dest, model_files, caplog):
    source = multipart_model(store, model_files, "tiny/mp", checksum="crc32")
    store.deny_object_attributes = True  # the fill's role lacks s3:GetObjectAttributes
    with caplog.at_level(logging.INFO, logger="serving.fetch"):
        assert fast_fill(source, dest).size_only == (WEIGHTS,)
    assert f"{WEIGHTS}: cannot read its part sizes (" in caplog.text and "allow s3:GetObjectAttributes" in caplog.text


@pytest.mark.parametrize("lines, problem", [
    ("not a checksum line\n", "SHA256SUMS: line 1 is not `<sha256>  <path>`: 'not a checksum line'"),
    (f"{'0' * 64}  model-00002.safetensors\n", "SHA256SUMS lists model-00002.safetensors, which is not under "
                                               f"s3://{BUCKET}/tiny/mp/: the upload is incomplete"),
])
def test_unusable_sha256sums_fails_naming_the_line(store, dest, model_files, lines, problem):
    source = multipart_model(store, model_files, "tiny/mp")
    publish_sums(store, model_files, "tiny/mp", lines)
    with pytest.raises(FetchError, match=re.escape(problem)):
        fast_fill(source, dest)


def test_rehash_benchmark_runs_the_fetchers_own_check(tmp_path, capsys):
    """The README's re-hash rate comes from this script: it runs end to end (a speed is never asserted)."""
    from serving.bench import rehash

    out = tmp_path / "rehash.json"
    assert rehash.main(["--size-gb", "0.001", "--repeat", "1", "--dir", str(tmp_path), "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["cache"], row["gb"]) for row in rows] == [("warm", 0.001), ("cold", 0.001)]
    assert all(row["mb_per_s"] > 0 for row in rows)
    assert list(tmp_path.iterdir()) == [out]  # the scratch model is removed
