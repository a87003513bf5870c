"""Atomic writes: a failure midway leaves the old output intact and no temporary file behind."""

import pytest

from fewstep.io.atomic import atomic_path, write_text


def test_failed_folder_write_keeps_old_folder_and_cleans_up(tmp_path):
    final = tmp_path / "model"
    with atomic_path(final, directory=True) as tmp:
        (tmp / "fewstep.json").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "fewstep.json").write_text("half of v2")
            raise RuntimeError("crash")
    assert (final / "fewstep.json").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_text_write_replaces_whole_file(tmp_path):
    path = write_text(tmp_path / "a.json", "{}\n")
    write_text(path, '{"x": 1}\n')
    assert path.read_text() == '{"x": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
