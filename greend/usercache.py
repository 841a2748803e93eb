"""Files of a per-user cache ($XDG_CACHE_HOME/greend, ~/.cache/greend), kept only when they are
safe to trust: what the fast start-up paths store there (greend.config_cache: the validated
configuration; greend.tui.css_cache: Textual's parsed stylesheets).

A file is read only if it is a regular file (not a symbolic link) owned by the user, mode 0600, in
a directory owned by the user that nobody else may write to, and if its magic line and CRC match.
It is written atomically (a temporary file renamed over it), 0600, in a 0700 directory. Anything
else (absent, foreign, corrupted, an unusable location) is a miss: the caller computes the value
again, and never fails because of the cache.
"""

from __future__ import annotations

import logging
import os
import stat
import zlib
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/greend, else ~/.cache/greend (RuntimeError: no home directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "greend"


def dir_is_ours(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read(f: Path, magic: bytes) -> bytes | None:
    """The body stored in `f` under `magic`, or None (absent, not the user's own 0600 file in the
    user's own directory, another format, or corrupted)."""
    if not dir_is_ours(f.parent):
        return None
    try:
        fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.debug("%s: not the user's own 0600 file: ignored", f)
            return None
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = fh.read()
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        return None
    body = data[len(magic) + 4:]
    if zlib.crc32(body) != int.from_bytes(data[len(magic):len(magic) + 4], "big"):
        log.debug("%s: corrupted (CRC): ignored", f)
        return None
    return body


def write(f: Path, magic: bytes, body: bytes) -> bool:
    """Store `body` in `f` under `magic`: atomically, 0600, in a 0700 directory that is the user's
    own. False (and nothing written) when it cannot be."""
    try:
        f.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not dir_is_ours(f.parent):
            log.debug("%s: not the user's own directory (or writable by others): not written to",
                      f.parent)
            return False
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fd = -1
                fh.write(magic + zlib.crc32(body).to_bytes(4, "big") + body)
            os.replace(tmp, f)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except (OSError, ValueError) as e:
        log.debug("cache file %s not written: %s", f, e)
        return False
    return True
