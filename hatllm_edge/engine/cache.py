"""The on-disk cache: bundles built on first use and the engine's int8-expanded graphs.

``$HATLLM_CACHE`` (default ``~/.cache/hatllm-edge``) is checked before anything is loaded:
set but empty, or pointing at something that is not a folder, is refused; so is a folder
that cannot be written when something must be built there. Builders take a file lock
(``filelock`` on a ``.lock`` file beside what they build), so of several processes one
builds and the others wait and reuse its result; what is built is published by a rename,
and the partial folders of builders that died are removed by the next builder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from hatllm_edge.core.errors import InputError

log = logging.getLogger("hatllm_edge")

CACHE_ENV = "HATLLM_CACHE"
STALE_PARTIAL_SECONDS = 3600  # a partial folder this old is abandoned even if its pid lives on
PARTIAL = ".partial-"
OLD = ".old-"


def cache_root() -> Path:
    """``$HATLLM_CACHE``, else ``~/.cache/hatllm-edge``. Refuses a set-but-empty value (it would
    mean the current directory) and a path that exists but is not a folder."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "hatllm-edge"
    if not value.strip():
        raise InputError(f"{CACHE_ENV} is set but empty; unset it (default ~/.cache/hatllm-edge) or set it to a folder")
    root = Path(value).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"{CACHE_ENV}={value}: exists and is not a folder; point {CACHE_ENV} at a folder")
    return root


def require_writable(folder: Path) -> Path:
    """Create ``folder`` and prove it writable by writing a file there (``os.access`` says yes
    to root on a read-only mount); InputError naming ``$HATLLM_CACHE`` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = os.environ.get(CACHE_ENV)
        hint = f"{CACHE_ENV}={where}" if where is not None else f"the cache {cache_root()} (set {CACHE_ENV} to move it)"
        raise InputError(f"cannot write to {folder} ({e.strerror or e}); {hint} must be a writable folder") from None
    return folder


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (``filelock``: an OS lock, released by the kernel when
    the process dies, so a killed builder never leaves a stale lock). Says once, on stderr,
    when it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process that is building %s", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def partial_prefix(target: Path) -> str:
    """The name prefix of a folder being built for ``target``: it carries the builder's pid, so
    that a later builder can tell an abandoned one."""
    return f".{target.name}{PARTIAL}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path, max_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """Remove the partial (and half-replaced ``.old-``) folders left beside ``target`` by
    builders that died: their pid is gone, or they are older than ``max_age`` seconds. Returns
    what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    now = time.time()
    for p in target.parent.iterdir():
        if not p.name.startswith(f".{target.name}.") or not (PARTIAL in p.name or OLD in p.name):
            continue
        tail = p.name.split(PARTIAL, 1)[1] if PARTIAL in p.name else ""
        pid = int(tail.split("-", 1)[0]) if tail.split("-", 1)[0].isdigit() else None
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if (pid is not None and pid != os.getpid() and not _pid_alive(pid)) or age > max_age:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- the int8-expanded graphs -------------------------------------------------------------

INT8_DIR = "int8"
INT8_KEEP = 4  # expanded graphs kept (166 MB each for the shipped model); least recently used go
SIDECAR = ".sha256"


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Int8Cache:
    """Expanded graphs under ``<cache>/int8/<key>.onnx``, each with its own sha256 in
    ``<key>.onnx.sha256`` (written, atomically, after the graph): an entry is used only when
    the two agree. At most :data:`INT8_KEEP` entries are kept, by last use."""

    def __init__(self, root: Path, keep: int = INT8_KEEP) -> None:
        self.dir = root / INT8_DIR
        self.keep = keep

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.onnx"

    def read(self, key: str) -> bytes | None:
        """The entry's bytes when present and matching its sha256; None when absent. An entry
        that does not match (or lacks its hash) is removed, with a warning, and None returned."""
        import hashlib

        path = self.path(key)
        sidecar = path.with_name(path.name + SIDECAR)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cached int8 graph %s is unreadable (%s); expanding the bundle's graph again", path, e.strerror or e)
            return None
        try:
            expected = sidecar.read_text().strip()
        except (OSError, UnicodeDecodeError):
            expected = None
        if expected != hashlib.sha256(data).hexdigest():
            why = "has no sha256 beside it" if expected is None else "does not match its sha256"
            log.warning("cached int8 graph %s %s; rebuilding it from the verified bundle", path, why)
            self.drop(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for eviction
        return data

    def write(self, key: str, data: bytes) -> None:
        """Store an entry (graph first, then its hash), then evict beyond :attr:`keep`."""
        import hashlib

        path = self.path(key)
        write_atomically(path, data)
        write_atomically(path.with_name(path.name + SIDECAR), (hashlib.sha256(data).hexdigest() + "\n").encode())
        self.evict(protect=key)

    def drop(self, key: str) -> None:
        path = self.path(key)
        for p in (path.with_name(path.name + SIDECAR), path):
            with contextlib.suppress(OSError):
                p.unlink()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.dir / ".lock", f"an int8 graph in {self.dir}")

    def evict(self, protect: str | None = None) -> list[str]:
        """Remove all but the :attr:`keep` most recently used entries (and temporary files of
        writers that died). Returns the keys removed."""
        entries = []
        for p in self.dir.glob("*.onnx"):
            with contextlib.suppress(OSError):
                entries.append((p.stat().st_mtime, p.stem))
        entries.sort(reverse=True)
        removed = [key for _, key in entries[self.keep:] if key != protect]
        for key in removed:
            self.drop(key)
        for p in self.dir.glob(".*.tmp"):  # .<name>.<pid>.tmp of write_atomically
            pid = p.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    p.unlink()
        return removed
