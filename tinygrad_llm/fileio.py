"""Writing files so that a crash never leaves half of one: `atomic_write`, and the clean-up of the
temporary files that a process killed in the middle of a write leaves behind: `remove_stale_temporaries`."""
import os
import re
import tempfile
import threading
from pathlib import Path

# A temporary file of target `name` is ".{name}.{pid}.{8 random characters}.tmp" (tempfile.mkstemp's
# random part: lowercase letters, digits, underscore). Files named so were written by atomic_write; only
# they are ever removed. Before the writer's pid was part of the name it was ".{name}.{random}.tmp".
_RANDOM = r"[a-z0-9_]{8}"
_in_flight = set()            # this process's temporary files now being written (by any thread)
_in_flight_lock = threading.Lock()


def _temporary_pattern(name):
    return re.compile(re.escape(f".{name}.") + rf"(?:(\d+)\.)?{_RANDOM}\.tmp")


def _writer_alive(pid):
    if pid == os.getpid():
        return True           # this process: the caller checks its in-flight set
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True           # another user's live process, or a pid we cannot ask about: keep its file
    return True


def remove_stale_temporaries(path):
    """Remove the temporary files that atomic_write left beside `path` when its process was killed.

    Only files named as atomic_write names them for this very target are considered, and of those only
    files whose writer is gone: its process no longer runs, or it is this process and no write of ours
    has the file open (a process started again may get the same pid). Returns the paths removed.
    """
    path = Path(path)
    pattern = _temporary_pattern(path.name)
    try:
        entries = os.listdir(path.parent)
    except OSError:           # no such folder yet, or not readable: nothing to clean
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        candidate = path.parent / entry
        pid = int(match.group(1)) if match.group(1) else None
        if pid is not None and _writer_alive(pid):
            if pid != os.getpid():
                continue
            with _in_flight_lock:
                if os.path.abspath(candidate) in _in_flight:
                    continue
        try:
            if candidate.is_file() and not candidate.is_symlink():
                candidate.unlink()
                removed.append(candidate)
        except OSError:       # removed meanwhile by another process, or not ours to remove
            pass
    return removed


def atomic_write(path, content):
    """Write `content` (bytes, str as UTF-8, or a callable f -> None given a binary file) to `path` atomically.

    The data goes to a temporary file beside `path`, is fsynced, then renamed over `path`: readers see
    the old file or the new one, never a part. On any error the temporary file is removed; one left by
    a process killed mid-write is removed by the next write (or checkpoint load) of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    with _in_flight_lock:
        _in_flight.add(os.path.abspath(tmp))
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(os.path.abspath(tmp))
    try:  # make the rename itself durable; not every platform lets a folder be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
