"""Saving into a directory without ever losing a user's file or leaving it without a complete adapter.

A save owns exactly the files it writes, and says so in ``encore_manifest.json`` (the sha256 and size of every file of
the save). The next save replaces exactly those files and leaves everything else in the directory (a user's notes,
symlinks, the directory's own mode) as it was. The replacement is a short transaction inside the directory:

1. the caller writes the whole new save into a hidden staging directory (same filesystem, so renames are atomic);
2. a journal names the previous save's files, the new files and a hidden backup directory;
3. the previous save's files move into the backup (its root manifest first), the new files move in, and the new root
   manifest moves in last: that rename is the commit point;
4. the journal, the backup and the staging directory are deleted.

After a crash anywhere, :func:`recover_interrupted_save` (run by the next save and by load) reads the journal and
either finishes the save (the new root manifest is in place) or puts the previous save back, so the directory always
ends up with one complete adapter. A file lock makes a second process wait for the first.

This module uses only the standard library and ``filelock`` (no torch, nothing else from hf_encore), so that crash
tests can load it by file path in a fresh process in milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator

import filelock

MANIFEST = "encore_manifest.json"
MANIFEST_FORMAT = "hf_encore.manifest"
MANIFEST_VERSION = 1

# Every hidden entry this module makes starts with this prefix; nothing else in a directory is ever deleted by it.
_OWN_PREFIX = ".encore."
LOCK_FILE = ".encore.lock"
_JOURNAL = ".encore.journal.json"
_JOURNAL_TMP = ".encore.journal.json.tmp"
_STAGING_PREFIX = ".encore.staging-"
_BACKUP_PREFIX = ".encore.backup-"

# The files of a save from before manifests existed (encore_state.json marks it as ours).
_LEGACY_FILES = ("adapter_config.json", "adapter_model.safetensors", "encore_state.json", "encore_state.safetensors",
                 "encore_ledger.jsonl", "README.md")
_LEGACY_STATE = "encore_state.json"
_ADAPTER_CONFIG = "adapter_config.json"
_PEFT_TYPE = "ENCORE"
_SHOWN_ENTRIES = 5


class SaveTargetError(ValueError):
    """A save cannot go to this path (not an adapter directory, a file, a dangling link, a name taken by a user's
    file). The message names the path and the problem; nothing in the path was changed."""


class SaveLockTimeout(TimeoutError):
    """Another process kept saving to the same directory for longer than the lock timeout."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- manifests ------------------------------------------------------------------------------------------------


def _is_safe_relative(name: object) -> bool:
    """A relative POSIX path that stays inside its directory and does not name one of this module's hidden entries."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") and not part.startswith(_OWN_PREFIX) for part in parts)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of the save in ``directory`` (``None`` when there is none).

    Raises ``ValueError`` naming the file when it is unreadable or malformed, including a listed path that is
    absolute, contains ``..`` or otherwise leaves the directory.
    """
    path = Path(directory) / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err}); the file is corrupted or truncated") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not an hf_encore manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: malformed (version {version!r})")
    if version > MANIFEST_VERSION:
        raise ValueError(f"{path}: written by a newer hf_encore (manifest version {version}); upgrade hf_encore")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: malformed (\"files\" is not an object)")
    for name, entry in files.items():
        if not _is_safe_relative(name):
            raise ValueError(f"{path}: lists {name!r}, which is not a plain relative path inside {directory}")
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if (not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)
                or not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ValueError(f"{path}: malformed entry for {name!r} (needs a sha256 hex digest and a size)")
    return manifest


def _manifest_bytes(files: dict[str, dict]) -> bytes:
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
    return (json.dumps(manifest, indent=1) + "\n").encode("utf-8")


def _write_manifests(staging: Path) -> list[str]:
    """Write a manifest into every directory of the staging tree (deepest first, so that each manifest is listed by
    the ones above it); return every file of the save, as relative POSIX paths."""
    listed: dict[str, list[str]] = {}  # directory (relative, "" for the root) -> its files, relative to the root
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(staging).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise SaveTargetError(f"{staging}: the save wrote a symbolic link {name!r}; only files can be saved")
            listed.setdefault(rel_dir, []).append(f"{rel_dir}/{name}" if rel_dir else name)
    listed.setdefault("", [])
    for rel_dir in sorted(listed, key=lambda d: (-d.count("/") - bool(d), d)):
        entries = {}
        for directory in listed:
            if rel_dir and not (directory == rel_dir or directory.startswith(rel_dir + "/")):
                continue
            for rel in listed[directory]:
                if rel == MANIFEST or (rel_dir and rel == f"{rel_dir}/{MANIFEST}"):
                    continue
                path = staging / rel
                entries[rel[len(rel_dir) + 1:] if rel_dir else rel] = {"sha256": sha256_file(path),
                                                                       "size": path.stat().st_size}
        manifest_path = staging / rel_dir / MANIFEST
        manifest_path.write_bytes(_manifest_bytes(entries))
        own = f"{rel_dir}/{MANIFEST}" if rel_dir else MANIFEST
        if own not in listed[rel_dir]:
            listed[rel_dir].append(own)
    return sorted(rel for files in listed.values() for rel in files)


# ---- what a directory holds -----------------------------------------------------------------------------------


def _visible_entries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith(_OWN_PREFIX))


def _is_legacy_adapter_dir(directory: Path) -> bool:
    """A directory saved by hf_encore before manifests: it has encore_state.json, or PEFT's config says ENCORE (a
    save made with save_editing_state=False)."""
    if os.path.isfile(directory / _LEGACY_STATE):
        return True
    try:
        config = json.loads((directory / _ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == _PEFT_TYPE


def _is_plain_file_inside(root: Path, rel: str) -> bool:
    """``root/rel`` exists and is not a directory, and no directory on the way to it is a link (so touching it can
    never reach outside ``root``)."""
    parts = rel.split("/")
    current = root
    for part in parts[:-1]:
        current = current / part
        if os.path.islink(current) or not os.path.isdir(current):
            return False
    return os.path.lexists(current / parts[-1]) and not (
        os.path.isdir(current / parts[-1]) and not os.path.islink(current / parts[-1]))


def _previous_save_files(directory: Path) -> list[str]:
    """The files of the save now in ``directory`` (relative POSIX paths): exactly what the next save may replace."""
    manifest = read_manifest(directory)
    if manifest is not None:
        names = set(manifest["files"]) | {MANIFEST}
    else:
        names = set()
        if _is_legacy_adapter_dir(directory):
            names.update(_LEGACY_FILES)
            for entry in os.scandir(directory):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(_OWN_PREFIX) and (
                        _is_legacy_adapter_dir(Path(entry.path))):
                    names.update(f"{entry.name}/{name}" for name in _LEGACY_FILES)
    return sorted(name for name in names if _is_plain_file_inside(directory, name))


def check_save_target(path: str | os.PathLike) -> None:
    """Raise :class:`SaveTargetError` unless a save may go to ``path``: it does not exist, is an empty directory, or
    holds an hf_encore adapter (whose files the save then replaces; other entries are kept)."""
    path = Path(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise SaveTargetError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; refusing "
                              "to save through it")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise SaveTargetError(f"{path} exists and is not a directory; refusing to save an adapter there")
    entries = _visible_entries(path)
    if not entries or os.path.lexists(path / _JOURNAL):  # an interrupted save: recovered under the lock first
        return
    try:
        if read_manifest(path) is not None or _is_legacy_adapter_dir(path):
            return
    except ValueError as err:
        raise SaveTargetError(f"{path} holds a damaged adapter manifest ({err}); remove {MANIFEST} if the "
                              "directory is not an adapter, or save elsewhere") from err
    shown = ", ".join(entries[:_SHOWN_ENTRIES]) + (f", … ({len(entries)} entries)" if len(entries) > _SHOWN_ENTRIES
                                                   else "")
    raise SaveTargetError(f"{path} is not empty and is not an hf_encore adapter directory (it holds {shown}); "
                          "refusing to save into it so that none of its files are replaced. Save to a new or empty "
                          "directory")


# ---- durability helpers ---------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the renames are still atomic
        pass
    finally:
        os.close(fd)


def _write_journal(directory: Path, journal: dict) -> None:
    """Replace the journal in one step (a half-written journal is never read: it lives under a temporary name)."""
    tmp = directory / _JOURNAL_TMP
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(journal, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / _JOURNAL)
    _fsync_dir(directory)


def _move(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)


def _parents(rel: str) -> list[str]:
    """The directories on the way to ``rel``, outermost first (``"a/b/f"`` -> ``["a", "a/b"]``)."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _remove_empty_dirs(directory: Path, candidates: set[str]) -> None:
    for rel in sorted(candidates, key=lambda d: -d.count("/")):
        path = directory / rel
        if not os.path.islink(path) and os.path.isdir(path):
            with contextlib.suppress(OSError):  # not empty: something that is not ours is in it, keep it
                os.rmdir(path)


# ---- recovery -------------------------------------------------------------------------------------------------


def _stale_dirs(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory)
                  if name.startswith((_STAGING_PREFIX, _BACKUP_PREFIX)) and os.path.isdir(directory / name)
                  and not os.path.islink(directory / name))


def _finish(directory: Path, journal: dict) -> None:
    """The last step of a save or of a roll-back: remove the journal, then what it pointed to."""
    os.unlink(directory / _JOURNAL)
    _fsync_dir(directory)
    for name in (journal["backup"], journal["staging"]):
        shutil.rmtree(directory / name, ignore_errors=True)


def _roll_forward(directory: Path, journal: dict) -> None:
    new = set(journal["new"])
    # Sub-directories that only the previous save used, now empty (a user's file in one keeps it); before the
    # journal goes, since nothing else records that they were ours.
    _remove_empty_dirs(directory, {d for rel in journal["old"] for d in _parents(rel)}
                       - {d for rel in new for d in _parents(rel)})
    _finish(directory, journal)


def _roll_back(directory: Path, journal: dict) -> None:
    """Put the previous save back. Safe to run again if it is itself interrupted: the journal records when the new
    files are all gone, before the previous ones start coming back under the same names."""
    staging, backup = directory / journal["staging"], directory / journal["backup"]
    if journal.get("phase") != "restore":
        # A new file missing from staging has been moved in (every one was in staging when the journal was written,
        # and all previous files were moved out before the first new one moved in).
        for rel in journal["new"]:
            if not os.path.lexists(staging / rel) and os.path.lexists(directory / rel):
                os.unlink(directory / rel)
        journal = dict(journal, phase="restore")
        _write_journal(directory, journal)
    old = sorted(journal["old"], key=lambda rel: rel == MANIFEST)  # the root manifest last, as in a save
    for rel in old:
        if os.path.lexists(backup / rel):
            _move(backup / rel, directory / rel)
    _remove_empty_dirs(directory, set(journal["created_dirs"]))
    _fsync_dir(directory)
    _finish(directory, journal)


def _recover_locked(directory: Path) -> str | None:
    """Finish or undo an interrupted save and remove stale staging; the caller holds the lock."""
    done = []
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / _JOURNAL_TMP)  # a journal that was never put in place: nothing had moved yet
    journal_path = directory / _JOURNAL
    if os.path.lexists(journal_path):
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            names = [journal["staging"], journal["backup"]] + journal["old"] + journal["new"] + journal["created_dirs"]
            new_manifest_sha256 = journal["new_manifest_sha256"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{journal_path}: unreadable journal of an interrupted save ({err})") from err
        if not all(_is_safe_relative(name) for name in names[2:]) or not all(
                isinstance(n, str) and n.startswith((_STAGING_PREFIX, _BACKUP_PREFIX)) and "/" not in n
                for n in names[:2]):
            raise ValueError(f"{journal_path}: malformed journal of an interrupted save (a path leaves {directory})")
        root_manifest = directory / MANIFEST
        committed = (journal.get("phase") != "restore" and os.path.isfile(root_manifest)
                     and sha256_file(root_manifest) == new_manifest_sha256)
        if committed:
            _roll_forward(directory, journal)
            done.append("finished an interrupted save (its new files were all in place)")
        else:
            _roll_back(directory, journal)
            done.append("rolled back an interrupted save and restored the previous complete save")
    stale = _stale_dirs(directory)
    for name in stale:
        shutil.rmtree(directory / name, ignore_errors=True)
    if stale:
        done.append(f"removed {len(stale)} leftover staging folder(s) of an interrupted save")
    return f"{directory}: " + "; ".join(done) if done else None


def _needs_recovery(directory: Path) -> tuple[bool, bool]:
    """(a journal is there, stale staging or backup folders are there)."""
    journal = os.path.lexists(directory / _JOURNAL) or os.path.lexists(directory / _JOURNAL_TMP)
    return journal, bool(_stale_dirs(directory))


def _lock(directory: Path, timeout: float) -> filelock.FileLock:
    return filelock.FileLock(str(directory / LOCK_FILE), timeout=timeout, mode=0o644)


def recover_interrupted_save(path: str | os.PathLike, *, lock_timeout: float = 600) -> str | None:
    """Finish or roll back a save to ``path`` that was interrupted (a kill, a power cut), and remove leftover
    staging folders. Returns a one-line description of what was done, or ``None`` when there was nothing to do.

    Writes nothing (not even the lock file) in a directory with nothing to recover, so it is safe on read-only
    caches. Staging folders without a journal may belong to a save in progress in another process: they are only
    removed when the lock is free.
    """
    directory = Path(os.path.realpath(path))
    if not os.path.isdir(directory):
        return None
    journal, stale = _needs_recovery(directory)
    if not (journal or stale):
        return None
    try:
        # A journal means the adapter may be half-replaced: wait for the saver (its commit is quick) or recover.
        # Staging alone does not affect what loads: skip it if another process is saving right now.
        with _lock(directory, lock_timeout if journal else 0):
            return _recover_locked(directory)
    except filelock.Timeout as err:
        if not journal:
            return None
        raise SaveLockTimeout(f"{directory}: another process has been saving here for over {lock_timeout} s "
                              f"(lock {directory / LOCK_FILE}); try again when it has finished") from err


# ---- the save transaction -------------------------------------------------------------------------------------


def _check_names(directory: Path, old: list[str], new: list[str]) -> None:
    """Refuse (nothing changed yet) a new file whose name is taken by something that is not the previous save's."""
    old_set = set(old)
    old_dirs = {d for rel in old for d in _parents(rel)}
    for rel in new:
        for parent in _parents(rel):
            path = directory / parent
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                raise SaveTargetError(f"{directory}: the save needs a directory {parent!r}, but a file or link of "
                                      "that name is there; nothing was changed")
            if os.path.isdir(path) and parent not in old_dirs:
                raise SaveTargetError(f"{directory}: the save would write {rel!r} into the folder {parent!r}, which "
                                      "is not part of the previous save; nothing was changed")
        if rel not in old_set and os.path.lexists(directory / rel):
            raise SaveTargetError(f"{directory}: the save would replace {rel!r}, which is not part of the previous "
                                  "save; rename or move it. Nothing was changed")


def _ordinary_file_mode(staging: Path) -> int:
    """The mode a plain ``open()`` gives a new file here (0o666 less the umask), read without changing the umask
    (which is process-wide)."""
    probe = staging / ".encore.mode-probe"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _commit(directory: Path, staging: Path) -> None:
    new = _write_manifests(staging)
    # Some writers (safetensors) create files 0600; an adapter's files get the mode any other file would get.
    mode = _ordinary_file_mode(staging)
    for rel in new:
        if stat.S_IMODE(os.stat(staging / rel).st_mode) != mode:
            os.chmod(staging / rel, mode)
    for rel in new:
        _fsync_file(staging / rel)  # the data reaches the disk before any rename makes it the adapter
    old = _previous_save_files(directory)
    _check_names(directory, old, new)
    created_dirs = sorted({d for rel in new for d in _parents(rel) if not os.path.lexists(directory / d)})
    journal = {
        "staging": staging.name,
        "backup": _BACKUP_PREFIX + staging.name.removeprefix(_STAGING_PREFIX),
        "old": old,
        "new": new,
        "created_dirs": created_dirs,
        "new_manifest_sha256": sha256_file(staging / MANIFEST),
        "phase": "commit",
    }
    backup = directory / journal["backup"]
    _write_journal(directory, journal)
    try:
        os.mkdir(backup)
        # The previous root manifest leaves first: from then on the directory no longer claims to hold that save.
        for rel in sorted(old, key=lambda r: r != MANIFEST):
            _move(directory / rel, backup / rel)
        # The new root manifest arrives last: that rename is the commit point.
        for rel in sorted(new, key=lambda r: r == MANIFEST):
            _move(staging / rel, directory / rel)
        for parent in sorted({d for rel in new for d in _parents(rel)}):
            _fsync_dir(directory / parent)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(Exception):
            _recover_locked(directory)
        raise
    _roll_forward(directory, journal)


@contextlib.contextmanager
def save_transaction(path: str | os.PathLike, *, lock_timeout: float = 600) -> Iterator[Path]:
    """Yield an empty staging directory; write the complete new save into it. On a clean exit it replaces the
    previous save in ``path`` (only its files); if the body raises, nothing in ``path`` changes.

    A symlink at ``path`` is written through (its target is updated). Raises :class:`SaveTargetError` for a path that
    does not hold an adapter (see :func:`check_save_target`) and :class:`SaveLockTimeout` when another process keeps
    saving there for longer than ``lock_timeout`` seconds.
    """
    check_save_target(path)
    directory = Path(os.path.realpath(path))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(directory, lock_timeout)
        lock.acquire()
    except filelock.Timeout as err:
        raise SaveLockTimeout(f"{directory}: another process has been saving here for over {lock_timeout} s "
                              f"(lock {directory / LOCK_FILE}); try again when it has finished") from err
    try:
        _recover_locked(directory)
        check_save_target(directory)  # again: it may have changed while we waited for the lock
        staging = directory / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        os.mkdir(staging)
        try:
            yield staging
            _commit(directory, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
