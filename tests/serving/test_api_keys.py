"""The keys file shared by the model server and the gateway: parsing, limits, constant-time lookup, rotation."""
from __future__ import annotations

import os

import pytest

from serving.api_keys import KeyFileError, KeyRing, parse_keys, read_keys_file


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_and_named_keys_with_limits():
    keys = parse_keys("# team keys\n\nsk-plain-1\nanalytics:sk-a rpm=60 tpm=2000\n  sk-plain-2  \n", "f")
    assert [(k.name, k.secret, k.requests_per_minute, k.tokens_per_minute) for k in keys] == [
        ("key-1", b"sk-plain-1", None, None),
        ("analytics", b"sk-a", 60, 2000),
        ("key-3", b"sk-plain-2", None, None),
    ]


def test_a_key_never_shows_in_its_repr():
    (key,) = parse_keys("team:sk-secret-value", "f")
    assert "sk-secret-value" not in repr(key)


@pytest.mark.parametrize("text, message", [
    ("team:sk-a rpm=0", "'rpm=0' is not a limit"),
    ("team:sk-a rps=5", "'rps=5' is not a limit"),
    ("team:sk-a tpm=lots", "'tpm=lots' is not a limit"),
    ("team:", "the key after 'team:' is empty"),
    ("team:sk-a\nteam:sk-b", "the name 'team' is used twice"),
    ("sk-a\nother:sk-a", "the same key is listed twice"),
])
def test_malformed_lines_name_the_line_and_never_the_key(text, message):
    with pytest.raises(KeyFileError) as err:
        parse_keys(text, "API_KEYS_FILE 'k'")
    assert message in str(err.value)
    assert "line " in str(err.value)
    assert "sk-b" not in str(err.value)


def test_a_key_with_a_colon_but_no_valid_name_is_a_plain_key():
    (key,) = parse_keys("!!:weird", "f")
    assert (key.name, key.secret) == ("key-1", b"!!:weird")


def test_an_empty_or_missing_file_is_refused(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="contains no keys"):
        read_keys_file(empty)
    with pytest.raises(KeyFileError, match="cannot be read"):
        read_keys_file(tmp_path / "absent")


def test_authenticate_finds_the_key_and_refuses_others(tmp_path):
    path = tmp_path / "keys"
    path.write_text("a:sk-aaa\nb:sk-bbb\n")
    ring = KeyRing(path, extra_key="sk-env")
    assert ring.enabled
    assert ring.authenticate("sk-bbb").name == "b"
    assert ring.authenticate("sk-env").name == "env"
    assert ring.authenticate("sk-bb") is None
    assert ring.authenticate("\ud800") is None  # a lone surrogate is a wrong key, not an encoding error


def test_no_file_and_no_env_key_is_open():
    ring = KeyRing(None)
    assert not ring.enabled
    assert ring.authenticate("anything") is None


def _rotate(path, text):
    """Replace the file the way the kubelet updates a Secret volume: a new file swapped in (a new inode)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_rotated_file_is_taken_after_the_check_interval(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-old\n")
    clock = FakeClock()
    ring = KeyRing(path, clock=clock)
    _rotate(path, "sk-new\n")
    assert ring.authenticate("sk-old") is not None  # within the interval: not looked at yet
    clock.now += 1.5
    assert ring.authenticate("sk-old") is None
    assert ring.authenticate("sk-new") is not None
    assert ring.reloads == 1


def test_a_symlinked_secret_volume_update_is_seen(tmp_path):
    # A Secret volume: keys -> ..data/keys, ..data -> ..v1; an update points ..data at ..v2.
    for version, key in (("..v1", "sk-one"), ("..v2", "sk-two")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "keys").write_text(key + "\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "keys").symlink_to("..data/keys")
    clock = FakeClock()
    ring = KeyRing(tmp_path / "keys", clock=clock)
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    clock.now += 2
    assert ring.authenticate("sk-two") is not None
    assert ring.authenticate("sk-one") is None


@pytest.mark.parametrize("replacement", ["", "team:sk-x rpm=nope\n"])
def test_a_bad_replacement_keeps_the_keys_in_force_and_logs_once(tmp_path, caplog, replacement):
    path = tmp_path / "keys"
    path.write_text("sk-old\n")
    clock = FakeClock()
    ring = KeyRing(path, clock=clock)
    _rotate(path, replacement)
    for _ in range(3):
        clock.now += 2
        assert ring.authenticate("sk-old") is not None
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "previous keys stay in force" in errors[0].getMessage()
    _rotate(path, "sk-fixed\n")
    clock.now += 2
    assert ring.authenticate("sk-fixed") is not None and ring.authenticate("sk-old") is None


def test_a_deleted_file_keeps_the_keys_in_force(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-old\n")
    clock = FakeClock()
    ring = KeyRing(path, clock=clock)
    path.unlink()
    clock.now += 2
    assert ring.authenticate("sk-old") is not None
