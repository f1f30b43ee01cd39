"""Atomic writes: the final name appears only with complete content; a failure leaves nothing behind."""

import pytest

from birdrounds.artifacts import atomic_open


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_successful_write_replaces_and_is_readable_by_others(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_open(target, "w") as f:
        f.write("{}")
    assert target.read_text() == "{}"
    assert target.stat().st_mode & 0o044 == 0o044
