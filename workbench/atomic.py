"""Files that appear whole or not at all, with the mode a plain write would give them.

A file is written to a temporary name beside its target, flushed to disk (``fsync``), then
renamed over the target, and the directory is synced so the rename itself survives a power cut.
A kill at any point leaves the old file or the new one, never a mix. The temporary name carries
the writer's process id: a later write to the same target removes what a dead writer left.

A new file gets the mode ``open()`` would give it (0666 less the umask); a replaced file keeps
its own mode, so ``chmod 644 report.json`` survives the next run.
"""
from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def target_mode(path: Path, directory: bool = False) -> int:
    """The mode ``path`` has now, or what a fresh file (0666) or directory (0777) gets under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return (0o777 if directory else 0o666) & ~_umask()


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A name beside ``path`` nobody can guess, that says which process made it."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's live process
        return True
    return True


def stale(path: Path, kind: str = "tmp") -> list[Path]:
    """Temporaries of ``kind`` beside ``path`` left by processes that are gone (killed mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{kind}-(\d+)-[0-9a-f]+$")
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(1))):
            found.append(p)
    return found


def fsync_dir(directory: Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:      # some file systems cannot open a directory for reading; the rename stands anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_files(path: Path):
    for p in stale(path):
        try:
            p.unlink()
        except OSError:
            pass


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; whatever was written there replaces ``path`` when the
    block ends without error (synced to disk first), and is removed otherwise."""
    path = Path(path)
    remove_stale_files(path)
    tmp = temp_name(path)
    mode = target_mode(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """``data`` into ``path`` whole or not at all (see the module's note)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # O_EXCL: the unguessable name is ours alone, nothing planted there is followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_all_atomic(files: dict[Path, str | bytes]) -> list[Path]:
    """Several files as one: every one is written and synced under a temporary name before any is renamed,
    so a failure while writing (a full disk) leaves none of the new set."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            remove_stale_files(path)
            tmp = temp_name(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, target_mode(path))
        for tmp, path in staged:
            os.replace(tmp, path)
        for parent in {p.parent for _, p in staged}:
            fsync_dir(parent)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return [p for _, p in staged]
