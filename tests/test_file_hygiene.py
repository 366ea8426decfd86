"""Files written whole, with their usual mode, synced before the rename, under names nobody can plant,
and what a killed write left behind cleaned by the next one."""
import os
import stat

import pandas as pd
import pytest

from workbench import atomic, export
from workbench.diagnostics.run import Diagnosis
from workbench.genie.files import atomic_path
from workbench.report import Report, write_atomic

DEAD_PID = 4_194_304 + 7          # above Linux's largest pid_max: no such process can exist


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_report_gets_the_umask_mode_and_a_replaced_one_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = Report(model="m", method="rtn", config={}).to_json(tmp_path / "r.json")
        assert mode(path) == 0o644
        os.chmod(path, 0o640)
        Report(model="m", method="gptq", config={}).to_json(path)
        assert mode(path) == 0o640 and Report.from_json(path).method == "gptq"
    finally:
        os.umask(old)


def test_the_file_is_synced_before_it_is_renamed(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "r.json", "{}")
    assert "fsync" in calls and calls.index("fsync") < calls.index("replace")


def test_genie_temp_names_cannot_be_planted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "report.json"
    # the name the old code used, planted as a link to somewhere else
    os.symlink(victim, tmp_path / f".{target.name}.{os.getpid()}.tmp")
    names = []
    for text in ("one", "two"):
        with atomic_path(target) as tmp:
            names.append(tmp.name)
            tmp.write_text(text)
    assert victim.read_text() == "keep me" and target.read_text() == "two"
    assert names[0] != names[1] and not target.is_symlink()


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    target = tmp_path / "r.json"
    left = tmp_path / f".r.json.tmp-{DEAD_PID}-0123456789ab"
    left.write_text('{"half": ')
    mine = tmp_path / f".r.json.tmp-{os.getpid()}-0123456789ab"   # a live writer's: left alone
    mine.write_text("{}")
    write_atomic(target, "{}")
    assert not left.exists() and mine.exists()


def checkpoint(path, tag):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tag").write_text(tag)


def test_partial_and_old_folders_of_a_killed_save_are_cleaned(tmp_path):
    target = tmp_path / "ckpt"
    checkpoint(target, "current")
    partial = tmp_path / f".ckpt.partial-{DEAD_PID}-aaaaaaaaaaaa"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".ckpt.old-{DEAD_PID}-bbbbbbbbbbbb"
    checkpoint(old, "previous")
    export.check_save_dir(target, overwrite=True, packed=False)
    assert not partial.exists() and not old.exists() and (target / "tag").read_text() == "current"


def test_a_save_killed_between_its_renames_gets_the_old_checkpoint_back(tmp_path):
    target = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{DEAD_PID}-bbbbbbbbbbbb"     # moved aside, the new one not yet in place
    checkpoint(old, "previous")
    with pytest.raises(export.WorkbenchError, match="exists; pass --overwrite"):
        export.check_save_dir(target, overwrite=False, packed=False)
    assert (target / "tag").read_text() == "previous" and not old.exists()


class ThreeFrames(Diagnosis):
    def frames(self):
        return {n: pd.DataFrame({"x": [1, 2]}) for n in ("a", "b", "c")}


def test_inspect_csvs_are_written_all_or_none(tmp_path, monkeypatch):
    d = ThreeFrames(config={})
    real, count = os.fsync, []

    def full_disk(fd):
        count.append(fd)
        if len(count) == 3:
            raise OSError(28, "No space left on device")
        real(fd)
    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError):
        d.to_csv(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(atomic.os, "fsync", real)
    assert sorted(p.name for p in d.to_csv(tmp_path)) == ["a.csv", "b.csv", "c.csv"]
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.csv", "c.csv"]
