"""ceu.files and ceu.runlog: a write that fails (an error, a full disk) leaves the previous file whole and no temporary
file; a resumed run's log rewrite is atomic and survives a last line cut short by a crash; where ceu caches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ceu.files import cache_root, replacing, write_text
from ceu.runlog import open_log, write_record


def listing(folder):
    return sorted(entry.name for entry in folder.iterdir())


TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")  # read_text turns \r into \n


@settings(max_examples=40, deadline=None)
@given(old=st.text(TEXT, max_size=200), new=st.text(TEXT, max_size=2000), cut=st.integers(0, 2000))
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_debris(tmp_path_factory, old, new, cut):
    folder = tmp_path_factory.mktemp("w")
    path = folder / "results.json"
    write_text(path, old)
    with pytest.raises(OSError, match="No space left"):
        with replacing(path) as temporary:
            temporary.write_text(new[:cut])  # part of the new content reached the disk, then:
            raise OSError(28, "No space left on device")
    assert path.read_text(encoding="utf-8") == old and listing(folder) == ["results.json"]
    write_text(path, new)
    assert path.read_text(encoding="utf-8") == new and listing(folder) == ["results.json"]


def test_the_temporary_keeps_the_suffix_and_lives_beside_the_file(tmp_path):
    """Writers that infer the format from the name (matplotlib's savefig) see .png; same folder, so os.replace is a
    rename on one file system."""
    with replacing(tmp_path / "sub" / "training.png") as temporary:
        assert temporary.suffix == ".png" and temporary.parent == tmp_path / "sub" and not temporary.exists()
        temporary.write_bytes(b"png")
    assert listing(tmp_path / "sub") == ["training.png"]


def test_a_folder_is_swapped_whole(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(tmp_path / "model") as temporary:
            temporary.mkdir()
            (temporary / "half.bin").write_text("half")
            raise RuntimeError("killed while saving")
    assert listing(tmp_path) == ["model"] and listing(tmp_path / "model") == ["old.bin"]
    with replacing(tmp_path / "model") as temporary:
        temporary.mkdir()
        (temporary / "new.bin").write_text("new")
    assert listing(tmp_path) == ["model"] and listing(tmp_path / "model") == ["new.bin"]


FULL_DISK = """
import importlib.util, resource, signal, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[2])  # ceu/files.py alone: no torch import
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, writes fail with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    files.write_text(sys.argv[1], "x" * 100_000)
except OSError as error:
    print("refused", error.errno)
"""


def test_a_real_file_size_limit_leaves_the_earlier_results(tmp_path):
    """A disk that fills mid-write, for real: RLIMIT_FSIZE makes the write fail after 4 kB."""
    path = tmp_path / "results.json"
    write_text(path, json.dumps({"earlier": "run"}))
    module = Path(__file__).resolve().parents[1] / "ceu" / "files.py"
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), str(module)], capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.startswith("refused"), run.stdout + run.stderr
    assert json.loads(path.read_text()) == {"earlier": "run"} and listing(tmp_path) == ["results.json"]


def log_lines(steps):
    return "".join(json.dumps({"step": step, "lambda": float(step)}) + "\n" for step in steps)


def test_resume_keeps_the_lines_up_to_the_checkpoint_and_drops_a_cut_last_line(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text(log_lines([1, 2, 3, 4]) + '{"step": 5, "lamb')  # killed while writing step 5
    log = open_log(str(path), resumed_step=3)
    write_record(log, {"step": 4, "lambda": 40.0})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[-1])["lambda"] == 40.0
    assert "dropping its last line" in capsys.readouterr().out
    # a complete last record without its newline is kept
    path.write_text(log_lines([1, 2]).rstrip("\n"))
    open_log(str(path), resumed_step=2).close()
    assert path.read_text() == log_lines([1, 2])


@pytest.mark.parametrize("content, message", [
    (log_lines([1]) + "garbage\n" + log_lines([2]), "line 2 is not a log record"),
    (log_lines([1]) + '{"no_step": 1}\n', "line 2 has no integer 'step'"),
    (log_lines([1]) + "[1, 2]\n", "line 2 has no integer 'step'"),
])
def test_a_damaged_or_foreign_log_is_refused_naming_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        open_log(str(path), resumed_step=1)
    assert path.read_text() == content


def test_the_resume_rewrite_is_atomic(tmp_path, monkeypatch):
    """Before: truncate, then write; a kill in between left an empty log. Now a failed rewrite leaves it whole."""
    path = tmp_path / "log.jsonl"
    path.write_text(log_lines([1, 2, 3]))

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        open_log(str(path), resumed_step=2)
    assert path.read_text() == log_lines([1, 2, 3]) and listing(tmp_path) == ["log.jsonl"]


def test_the_cache_root_is_ceu_cache_else_the_xdg_cache_home_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CEU_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("CEU_CACHE")
    assert cache_root() == tmp_path / "xdg" / "ceu"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "ceu"
