"""Saves never lose a user's file: a save owns exactly the files it wrote, refuses a folder that is not an adapter,
writes through a symlink, survives a kill at any step (load finds the old or the new adapter, never a mix), and
two processes saving to one folder take turns."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import filelock
import pytest
import torch

import hf_encore
import hf_encore.save_transaction as save_transaction_module
from hf_encore import EncoreConfig
from hf_encore.apps.cli import main as cli_main
from hf_encore.save_transaction import (
    LOCK_FILE,
    MANIFEST,
    SaveTargetError,
    check_save_target,
    read_manifest,
    recover_interrupted_save,
)

from tiny_models import TINY_LAYERS, deltas, fill_adapter, tiny_adapter, tiny_llama

MODULE_PATH = Path(save_transaction_module.__file__)


def listing(root: Path, *, hidden: bool = True) -> dict:
    """Everything under ``root``: kind, mode and contents (or link target) of each entry, the root's mode too."""
    entries = {".": ("dir", stat.S_IMODE(os.stat(root).st_mode))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not hidden and any(part.startswith(".") for part in rel.split("/")):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                entries[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return entries


def files_of(root: Path) -> dict:
    """The visible entries under ``root`` (what a user sees), without the root's own mode."""
    entries = listing(root, hidden=False)
    del entries["."]
    return entries


def kinds(entries: dict) -> dict:
    """Names, kinds and modes only (two saves of one model differ in bytes: safetensors' metadata order)."""
    return {name: entry[:2] for name, entry in entries.items()}


def hidden_entries(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root) if name.startswith("."))


def two_adapter_model(seed: int):
    """A tiny model with ``default`` and a second adapter ``other`` (saved in the sub-folder ``other/``)."""
    model = tiny_adapter(seed)
    model.add_adapter("other", EncoreConfig(method="memit", layers=list(TINY_LAYERS)))
    fill_adapter(model, seed + 100, "other")
    return model


def same_deltas(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loaded_deltas(directory: Path) -> dict:
    return deltas(hf_encore.from_pretrained(tiny_llama(0), directory))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapters A (two adapters) and B (one), each saved once: {name: (model, directory, its files)}."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, model in (("A", two_adapter_model(1)), ("B", tiny_adapter(2))):
        model.save_pretrained(root / name)
        out[name] = (model, root / name, files_of(root / name))
    return out


def copy_adapter(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=lambda d, names: [n for n in names if n.startswith(".")])


# ---- what a save may touch ------------------------------------------------------------------------------------


def project_folder(path: Path) -> Path:
    path.mkdir()
    (path / "README.md").write_text("# my project\n")
    (path / "encore_notes.csv").write_text("a,b\n1,2\n")
    (path / "adapter_notes.txt").write_text("notes")
    (path / "experiments").mkdir()
    (path / "experiments" / "adapter_config.json").write_text("{}")
    (path / "link").symlink_to("README.md")
    path.chmod(0o755)
    return path


def test_a_folder_that_is_not_an_adapter_is_refused_and_left_untouched(tmp_path):
    folder = project_folder(tmp_path / "project")
    before = listing(folder)
    with pytest.raises(SaveTargetError, match="project.*not an hf_encore adapter.*README.md"):
        tiny_adapter(1).save_pretrained(folder)
    assert listing(folder) == before
    with pytest.raises(SaveTargetError, match="project"):
        check_save_target(folder)
    # The CLI refuses it before loading any model (the model name given does not even exist).
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} plays", "subject": "X", "target_new": "golf"}]))
    assert cli_main(["edit", str(requests), "--model", "no/such-model", "--out", str(folder)]) != 0
    assert listing(folder) == before


def test_files_links_and_dangling_links_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("file", "dangling"):
        with pytest.raises(SaveTargetError, match=name):
            check_save_target(tmp_path / name)
    assert not (tmp_path / "nowhere").exists()
    check_save_target(tmp_path / "new")  # missing: fine
    (tmp_path / "empty").mkdir()
    check_save_target(tmp_path / "empty")


def test_a_second_save_replaces_only_the_first_saves_files(tmp_path, saved):
    out = tmp_path / "adapter"
    tiny_adapter(1).save_pretrained(out)
    (out / "NOTES.txt").write_text("mine")
    (out / "encore_notes.csv").write_text("also mine")
    (out / "link").symlink_to("NOTES.txt")
    out.chmod(0o751)
    mine = {k: v for k, v in listing(out).items() if k in (".", "NOTES.txt", "encore_notes.csv", "link")}
    model_b, _, files_b = saved["B"]
    model_b.save_pretrained(out)
    after = listing(out)
    assert {k: after[k] for k in mine} == mine
    assert kinds({k: v for k, v in files_of(out).items() if k not in mine}) == kinds(files_b)
    assert hidden_entries(out) == [LOCK_FILE]
    assert same_deltas(loaded_deltas(out), deltas(model_b))
    umask = os.umask(0o022)
    os.umask(umask)
    assert {after[k][1] for k in files_b} == {0o666 & ~umask}  # ordinary modes, not 0600


def test_fewer_adapters_remove_exactly_the_old_adapters_files(tmp_path, saved):
    model_a, _, files_a = saved["A"]
    model_b, _, files_b = saved["B"]
    ours, shared = tmp_path / "ours", tmp_path / "shared"
    for out in (ours, shared):
        model_a.save_pretrained(out)
        assert (out / "other" / MANIFEST).is_file()
    (shared / "other" / "mine.txt").write_text("mine")
    model_b.save_pretrained(ours)
    model_b.save_pretrained(shared)
    assert kinds(files_of(ours)) == kinds(files_b)  # other/ was only ours: gone
    assert kinds({k: v for k, v in files_of(shared).items() if k not in ("other", "other/mine.txt")}) == kinds(files_b)
    assert sorted(os.listdir(shared / "other")) == ["mine.txt"]


def test_a_name_taken_by_a_users_folder_is_refused_before_anything_moves(tmp_path, saved):
    out = tmp_path / "adapter"
    saved["B"][0].save_pretrained(out)
    (out / "other").mkdir()
    (out / "other" / "data.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(SaveTargetError, match="other"):
        saved["A"][0].save_pretrained(out)
    assert listing(out) == before


def test_a_save_from_before_manifests_is_replaced_and_a_users_file_kept(tmp_path, saved):
    out = tmp_path / "legacy"
    copy_adapter(saved["A"][1], out)
    for manifest in out.rglob(MANIFEST):
        manifest.unlink()
    (out / "NOTES.txt").write_text("mine")
    saved["B"][0].save_pretrained(out)
    notes = files_of(out).pop("NOTES.txt")
    assert notes[2] == b"mine" and kinds(files_of(out)) == kinds({**saved["B"][2], "NOTES.txt": notes})
    assert same_deltas(loaded_deltas(out), deltas(saved["B"][0]))


def test_saving_through_a_symlink_updates_its_target(tmp_path, saved):
    real, link = tmp_path / "real", tmp_path / "link"
    saved["A"][0].save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    saved["B"][0].save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert kinds(files_of(real)) == kinds(saved["B"][2])
    assert same_deltas(loaded_deltas(link), deltas(saved["B"][0]))


def test_manifests_list_every_file_and_refuse_paths_leaving_the_folder(tmp_path, saved):
    _, directory, files = saved["A"]
    root = read_manifest(directory)["files"]
    assert set(root) == {k for k, v in files.items() if v[0] == "file"} - {MANIFEST}
    assert "other/adapter_model.safetensors" in root and f"other/{MANIFEST}" in root
    assert set(read_manifest(directory / "other")["files"]) == {
        k.removeprefix("other/") for k in root if k.startswith("other/") and k != f"other/{MANIFEST}"}
    assert read_manifest(tmp_path) is None
    digest = {"sha256": "0" * 64, "size": 1}
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b", "./x", ".encore.lock"):
        (tmp_path / MANIFEST).write_text(json.dumps({"format": "hf_encore.manifest", "version": 1,
                                                     "files": {bad: digest}}))
        with pytest.raises(ValueError, match=MANIFEST):
            read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{trunc")
    with pytest.raises(ValueError, match=MANIFEST):
        read_manifest(tmp_path)


def test_recovery_writes_nothing_where_there_is_nothing_to_recover(tmp_path, saved):
    out = tmp_path / "copy"
    copy_adapter(saved["A"][1], out)
    out.chmod(0o555)  # as a read-only Hub cache
    try:
        before = listing(out)
        assert recover_interrupted_save(out) is None
        loaded_deltas(out)
        assert listing(out) == before
    finally:
        out.chmod(0o755)


# ---- crashes --------------------------------------------------------------------------------------------------

# Runs one save transaction that copies adapter B's files into staging over the target, with every call that
# changes the directory (or makes it durable) counted: at call number N the process kills itself with SIGKILL, as
# a power cut or OOM kill would, just before that call happens. "staging" mode kills after the N-th copied file.
CRASHING_SAVE = textwrap.dedent("""
    import importlib.util, json, os, shutil, signal, sys
    module_path, target, source, mode, kill_at = sys.argv[1:6]
    kill_at = int(kill_at)
    spec = importlib.util.spec_from_file_location("save_transaction_under_test", module_path)
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    calls, commit_call = 0, None

    def counted(name):
        real = getattr(os, name)
        def call(*args, **kwargs):
            global calls, commit_call
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "replace" and os.path.basename(str(args[1])) == st.MANIFEST and (
                    os.path.dirname(os.path.realpath(args[1])) == os.path.realpath(target)):
                commit_call = calls
            return real(*args, **kwargs)
        setattr(os, name, call)

    files = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs
                   if f != st.MANIFEST and not f.startswith("."))
    if mode == "recover":  # finish the interrupted save left in target, itself killed at call kill_at
        for name in ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir"):
            counted(name)
        done = st.recover_interrupted_save(target)
        print(json.dumps({"calls": calls, "done": done}))
        sys.exit(0)
    with st.save_transaction(target) as staging:
        if mode == "commit":
            for name in ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir"):
                counted(name)
        for number, rel in enumerate(files, 1):
            os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(source, rel), os.path.join(staging, rel))
            if mode == "staging" and number == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    print(json.dumps({"calls": calls, "commit_call": commit_call}))
""")


def crashing_save(target: Path, source: Path, mode: str, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(MODULE_PATH), str(target), str(source), mode,
                           str(kill_at)], capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # every kill point, each in a fresh process: ~10-20 s
def test_a_kill_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, saved, caplog):
    model_a, dir_a, files_a = saved["A"]
    model_b, dir_b, files_b = saved["B"]
    deltas_a, deltas_b = deltas(model_a), deltas(model_b)

    full = crashing_save(tmp_path / "full", dir_b, "commit", 0)  # counting only: a full save into a new folder
    assert full.returncode == 0, full.stderr
    target = tmp_path / "dry"
    copy_adapter(dir_a, target)
    full = crashing_save(target, dir_b, "commit", 0)
    assert full.returncode == 0, full.stderr
    counts = json.loads(full.stdout)
    assert files_of(target) == files_b
    total, commit_call = counts["calls"], counts["commit_call"]
    assert 20 < total < 200 and commit_call is not None

    kills = [("commit", n) for n in range(1, total + 1)] + [("staging", 1), ("staging", 3)]
    for mode, kill_at in kills:
        target = tmp_path / f"{mode}-{kill_at}"
        copy_adapter(dir_a, target)
        result = crashing_save(target, dir_b, mode, kill_at)
        assert result.returncode == -9, (mode, kill_at, result.stderr)
        new = mode == "commit" and kill_at > commit_call
        caplog.clear()
        if kill_at % 2:  # half the time the next thing to happen is a save, not a load: it recovers first
            model_b.save_pretrained(target)
            assert same_deltas(loaded_deltas(target), deltas_b) and hidden_entries(target) == [LOCK_FILE]
            continue
        loaded = loaded_deltas(target)
        assert same_deltas(loaded, deltas_b if new else deltas_a), (mode, kill_at)
        assert hidden_entries(target) in ([], [LOCK_FILE]), (mode, kill_at)
        expected = files_b if new else files_a
        assert files_of(target) == expected, (mode, kill_at)
        model_b.save_pretrained(target)  # and the next save works
        assert kinds(files_of(target)) == kinds(files_b)
        assert hidden_entries(target) == [LOCK_FILE]
    print(f"kill points tried: {len(kills)} ({total} steps of a full save, commit at step {commit_call})")


@pytest.mark.slow  # every kill point, each in a fresh process: ~10-20 s
def test_a_kill_while_recovering_still_restores_the_old_adapter(tmp_path, saved):
    model_a, dir_a, files_a = saved["A"]
    _, dir_b, _ = saved["B"]
    probe = tmp_path / "probe"
    copy_adapter(dir_a, probe)
    commit_call = json.loads(crashing_save(probe, dir_b, "commit", 0).stdout)["commit_call"]

    # Killed with every new file moved in but the root manifest: the longest roll-back.
    crashed = tmp_path / "crashed"
    copy_adapter(dir_a, crashed)
    assert crashing_save(crashed, dir_b, "commit", commit_call).returncode == -9
    target = tmp_path / "recovered"
    shutil.copytree(crashed, target, symlinks=True)
    full = crashing_save(target, dir_b, "recover", 0)
    assert full.returncode == 0, full.stderr
    report = json.loads(full.stdout)
    assert report["calls"] > 5 and "rolled back" in report["done"]
    assert files_of(target) == files_a
    for kill_at in range(1, report["calls"] + 1):
        target = tmp_path / f"killed-{kill_at}"
        shutil.copytree(crashed, target, symlinks=True)
        assert crashing_save(target, dir_b, "recover", kill_at).returncode == -9
        assert same_deltas(loaded_deltas(target), deltas(model_a)), kill_at
        assert files_of(target) == files_a, kill_at
        assert hidden_entries(target) == [LOCK_FILE], kill_at
    print(f"kill points tried while recovering: {report['calls']}")


# Saves a tiny adapter again and again (two adapters alternately) until killed; a fresh interpreter, since forking
# a process that has used torch's thread pool can hang the child.
SAVE_LOOP = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from hf_encore import EncoreConfig
    from tiny_models import TINY_LAYERS, fill_adapter, tiny_adapter
    other = tiny_adapter(2)  # as two_adapter_model(2), without importing the test module
    other.add_adapter("other", EncoreConfig(method="memit", layers=list(TINY_LAYERS)))
    fill_adapter(other, 102, "other")
    models = [tiny_adapter(1), other]
    print("ready", flush=True)
    for number in range(10 ** 6):
        models[number % 2].save_pretrained(sys.argv[2])
""")


@pytest.mark.slow  # two fresh processes saving until killed: ~10-20 s
def test_a_real_save_killed_at_random_points_loads_the_old_or_the_new_adapter(tmp_path):
    candidates = [deltas(tiny_adapter(1)), deltas(two_adapter_model(2))]
    rng = random.Random(7)
    outs = [tmp_path / f"adapter{i}" for i in range(2)]
    processes = []
    for out in outs:  # in parallel: each one pays for importing torch
        tiny_adapter(1).save_pretrained(out)
        processes.append(subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(Path(__file__).parent), str(out)],
                                          stdout=subprocess.PIPE, text=True))
    for out, process in zip(outs, processes):
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.8))
        process.kill()  # SIGKILL
        assert process.wait(30) == -9
        process.stdout.close()
        loaded = loaded_deltas(out)
        assert any(same_deltas(loaded, c) for c in candidates)
        assert hidden_entries(out) == [LOCK_FILE]


# Saves the adapter in ``source`` to ``target`` ``repeat`` times through the module alone (it starts in
# milliseconds, so that the two processes below really overlap), or reports a lock timeout.
COPYING_SAVE = textwrap.dedent("""
    import importlib.util, os, shutil, sys, time
    module_path, target, source, repeat, timeout = sys.argv[1:6]
    spec = importlib.util.spec_from_file_location("save_transaction_under_test", module_path)
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    files = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs
                   if f != st.MANIFEST and not f.startswith("."))
    start = float(os.environ["START_AT"])
    time.sleep(max(0.0, start - time.time()))
    try:
        for _ in range(int(repeat)):
            with st.save_transaction(target, lock_timeout=float(timeout)) as staging:
                for rel in files:
                    os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
                    shutil.copyfile(os.path.join(source, rel), os.path.join(staging, rel))
    except st.SaveLockTimeout as err:
        print(err)
""")


def copying_saves(target: Path, source: Path, repeat: int, timeout: float, start_at: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COPYING_SAVE, str(MODULE_PATH), str(target), str(source),
                             str(repeat), str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "START_AT": str(start_at)})


def test_two_processes_saving_at_once_take_turns(tmp_path, saved):
    out = tmp_path / "adapter"
    start_at = time.time() + 1.0  # both past their start-up by then
    processes = [copying_saves(out, saved[name][1], 15, 60, start_at) for name in ("A", "B")]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert results[0][0] == results[1][0] == ""  # no lock timeout
    final = files_of(out)
    assert final in (saved["A"][2], saved["B"][2])  # the whole of one save, nothing of the other
    winner = "A" if final == saved["A"][2] else "B"
    assert same_deltas(loaded_deltas(out), deltas(saved[winner][0]))
    assert hidden_entries(out) == [LOCK_FILE]


def test_a_save_waits_for_the_lock_then_gives_a_clear_error(tmp_path, saved):
    out = tmp_path / "adapter"
    tiny_adapter(1).save_pretrained(out)
    before = listing(out)
    with filelock.FileLock(str(out / LOCK_FILE)):  # held here; the save runs in another process
        process = copying_saves(out, saved["B"][1], 1, 0.3, time.time())
        message, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert "another process" in message and str(out) in message
    assert listing(out) == before
