"""Weight files by URL, into a local cache, as a user of torch.hub or detectron2 expects:

- the cache is $BMASK_JAX_HOME/weights (default ~/.cache/bmask_jax/weights), one file per URL at
  <host>/<path of the URL>, so the publisher's file name is kept and a file found there is
  used without asking the network;
- a progress bar;
- the bytes go to a temporary name beside the target and are moved in only when the transfer is
  complete (Content-Length reached) and the checksum fits: an interrupted download is never used,
  and a temporary file left by a killed run is removed by the next one;
- a transfer ends: besides the per-read timeout, one that brings fewer than `min_bytes` in any
  `stall_s` window (a server that drips a byte at a time) is stopped, with the bytes received;
- the cache checks what it holds: each file has a record beside it (<file>.record.json: URL,
  size, mtime, how it was checked). A cached file is checked before use by the checksum its
  name carries, else by the size recorded at download; the record spares the whole-file hash
  while the size and mtime are unchanged. A file that fails is moved aside (never deleted),
  said in one line, and downloaded again; one saved by hand (no record) that fails its
  checksum is refused in one line. A file with neither a checksum nor a Content-Length to
  check it by is kept "unconfirmed" until the weight reader reads it whole (confirm); one it
  cannot read is set aside the same way (set_aside);
- a checksum where the publisher gives one: detectron2's model-zoo files carry the first 6 hex
  digits of their md5 (MODEL_ZOO.md: "any model on this page contains its md5 prefix in its file
  name", e.g. model_final_a54504.pkl); torch.hub files carry a sha256 prefix (resnet50-0676ba61.pth);
- with no network (or a 404), one DownloadError naming the URL and the path to put the file at by
  hand.

`$BMASK_JAX_MIRROR` (a URL or a folder) replaces https://dl.fbaipublicfiles.com/ for clusters
without internet access: the same paths are fetched from the mirror.

Standard library (and tqdm) only: nothing here needs jax.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

DETECTRON2_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"
PUBLIC_FILES = "https://dl.fbaipublicfiles.com/"
_CHUNK = 1 << 20
RECORD_SUFFIX = ".record.json"
STALL_S = 60.0                     # a transfer must bring MIN_BYTES in every window of this length
MIN_BYTES = 64 << 10
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class DownloadError(OSError):
    """A file could not be fetched; the message names the URL and where to put the file by hand."""


def home() -> str:
    """$BMASK_JAX_HOME, default ~/.cache/bmask_jax: downloaded weights live in its weights/."""
    return os.path.expanduser(os.environ.get("BMASK_JAX_HOME") or os.path.join("~", ".cache", "bmask_jax"))


def expand_url(url: str) -> str:
    """detectron2://X (detectron2's own shorthand in its configs) -> the https URL it stands for."""
    if url.startswith("detectron2://"):
        return DETECTRON2_PREFIX + url[len("detectron2://"):]
    return url


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://", "detectron2://"))


def cache_path(url: str) -> str:
    """Where the file of `url` lives in the cache: weights/<host>[_<port>]/<path>, and a folder
    named for the query's hash before the file name where the URL has a query (m.pkl?v=1 and
    ?v=2 are different files). The path is decoded and its `.` and `..` segments dropped, and a
    host that is neither a host name nor an IP address (`..`, `%2e%2e`, none) is an error: the
    file is always inside weights/. User info (user:pass@) is not part of the name."""
    parsed = urllib.parse.urlparse(expand_url(url))
    parts = [p for p in urllib.parse.unquote(parsed.path).split("/") if p not in ("", ".", "..")]
    if not parts:
        raise DownloadError(f"{url}: the URL names no file")
    try:
        host, port = parsed.hostname or "", parsed.port
    except ValueError as e:                       # a port that is not a number
        raise DownloadError(f"{url}: {e}") from None
    if parsed.scheme in ("http", "https") and not (_HOST.fullmatch(host) or _is_ip(host)):
        raise DownloadError(f"{url}: {host!r} is not a host name" if host else f"{url}: the URL has no host")
    folder = (host.replace(":", "_") + (f"_{port}" if port else "")) if host else "local"
    if parsed.query:
        parts.insert(-1, "query-" + hashlib.sha256(parsed.query.encode()).hexdigest()[:12])
    return os.path.join(home(), "weights", folder, *parts)


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def publisher_checksum(url: str) -> tuple[str, str] | None:
    """(algorithm, hex prefix) the file name carries, or None. detectron2's model zoo:
    model_final_<md5[:6]>.pkl; torch.hub's convention (torchvision): <name>-<sha256[:8+]>.pth."""
    name = os.path.basename(urllib.parse.urlparse(expand_url(url)).path)
    if "/detectron2/" in expand_url(url) and (m := re.fullmatch(r"model_final_([0-9a-f]{6})\.pkl", name)):
        return "md5", m[1]
    if (m := re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", name)):
        return "sha256", m[1]
    return None


def _mirrored(url: str) -> str:
    """url on $BMASK_JAX_MIRROR, where it is set and url is on dl.fbaipublicfiles.com. The path
    may not climb out of the mirror: no `..` segment (percent-encoded or not) is passed on, and
    a folder mirror's file must resolve inside the folder (symbolic links included)."""
    mirror = os.environ.get("BMASK_JAX_MIRROR")
    if not mirror or not url.startswith(PUBLIC_FILES):
        return url
    rest = url[len(PUBLIC_FILES):]
    path = urllib.parse.unquote(urllib.parse.urlparse(rest).path)
    if ".." in path.split("/"):
        raise DownloadError(f"{url}: its path climbs out of the mirror ($BMASK_JAX_MIRROR={mirror})")
    if "://" not in mirror:                     # a folder: the file must lie inside it
        root = os.path.realpath(mirror)
        local = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, local]) != root:
            raise DownloadError(f"{url}: its path leads outside the mirror folder {root} ($BMASK_JAX_MIRROR)")
        return urllib.parse.urljoin("file:", urllib.request.pathname2url(local))
    return mirror.rstrip("/") + "/" + rest


def file_digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, checksum: tuple[str, str] | None | str = "auto", progress: bool = True,
          timeout: float = 60.0, stall_s: float = STALL_S, min_bytes: int = MIN_BYTES) -> str:
    """The local path of `url`'s file: from the cache once checked (check_cached), else
    downloaded into it. checksum: "auto" (what the file name carries, publisher_checksum), None,
    or (algorithm, hex prefix)."""
    url = expand_url(url)
    path = cache_path(url)
    if checksum == "auto":
        checksum = publisher_checksum(url)
    remove_stale_parts(path)
    if os.path.isfile(path):
        problem = check_cached(path, checksum)
        if problem is None:
            return path
        if read_record(path) is None:      # saved by hand: the user's file, not ours to replace
            raise DownloadError(f"{path}: {problem}; this is not the file {url} names. Remove it, or save the "
                                f"right file there")
        set_aside(path, problem)
    return download(url, path, checksum, progress, timeout, stall_s, min_bytes)


def download(url: str, path: str, checksum: tuple[str, str] | None = None, progress: bool = True,
             timeout: float = 60.0, stall_s: float = STALL_S, min_bytes: int = MIN_BYTES) -> str:
    """Download `url` to `path` through a temporary file beside it, and record it; returns path."""
    source = _mirrored(url)
    by_hand = f"download {url} yourself and save it as {path}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Unique per host and process: processes of a multi-host run may share the cache folder;
    # remove_stale_parts reads the host and pid back.
    partial = f"{path}.part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            response = urllib.request.urlopen(urllib.request.Request(source, headers={"User-Agent": "bmask_jax"}),
                                              timeout=min(timeout, stall_s))
        except urllib.error.HTTPError as e:
            raise DownloadError(f"cannot download {source}: HTTP {e.code} {e.reason}; {by_hand}") from None
        except (urllib.error.URLError, OSError, UnicodeError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"cannot download {source} (no network? {reason}); {by_hand}") from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = _copy(response, partial, total, progress, os.path.basename(path), source, by_hand,
                             stall_s, min_bytes)
        if total is not None and received != total:
            raise DownloadError(f"download of {source} was cut off after {received} of {total} bytes; "
                                f"nothing was kept. Try again, or {by_hand}")
        if checksum is not None:
            algorithm, prefix = checksum
            digest = file_digest(partial, algorithm)
            if not digest.startswith(prefix.lower()):
                raise DownloadError(f"{source}: the downloaded file's {algorithm} is {digest}, but its name says "
                                    f"it starts with {prefix}; the file was not kept. Try again, or {by_hand}")
        os.replace(partial, path)
        # Without a checksum, a Content-Length can be short of the body (the server's bytes past
        # it are never read) or absent: the weight reader confirms such a file by reading it.
        write_record(path, url, checked=f"{checksum[0]}:{checksum[1]}" if checksum else None,
                     confirmed=checksum is not None)
        return path
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _copy(response, partial: str, total: int | None, progress: bool, name: str, source: str, by_hand: str,
          stall_s: float, min_bytes: int) -> int:
    from tqdm import tqdm
    received = 0
    window_start, window_bytes = time.monotonic(), 0
    with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"downloading {name}", disable=not progress,
                                           dynamic_ncols=True) as bar:
        while True:
            try:
                # read1: whatever has arrived (up to a chunk), so that every byte is counted and
                # a slow drip is seen between reads; read(n) would wait for all n.
                block = response.read1(_CHUNK) if total is None or received < total else b""
            except Exception as e:  # noqa: BLE001 - http.client.IncompleteRead, a reset connection, a timeout
                raise DownloadError(f"download of {source} failed after {received} bytes ({e!r}); nothing "
                                    f"was kept. Try again, or {by_hand}") from None
            if not block:
                return received
            out.write(block)
            received += len(block)
            bar.update(len(block))
            now = time.monotonic()
            if now - window_start >= stall_s:
                if received - window_bytes < min_bytes:
                    raise DownloadError(
                        f"download of {source} stalled: {received - window_bytes} bytes in the last "
                        f"{now - window_start:.0f} s ({received} in all); nothing was kept. Try again, or {by_hand}")
                window_start, window_bytes = now, received


# ---------------------------------------------------------------------------------------------
# What the cache holds
# ---------------------------------------------------------------------------------------------

def read_record(path: str) -> dict | None:
    try:
        with open(path + RECORD_SUFFIX) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def write_record(path: str, url: str, checked: str | None, confirmed: bool) -> None:
    """<path>.record.json: what was downloaded and how it was checked (checked: "md5:<prefix>",
    "sha256:<prefix>" or None; confirmed: checked, or read whole by the weight reader), with the
    size and mtime it was checked at. Written through a temporary file."""
    st = os.stat(path)
    record = {"url": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "checked": checked,
              "confirmed": confirmed}
    temporary = f"{path}{RECORD_SUFFIX}.{uuid.uuid4().hex[:8]}"
    with open(temporary, "w") as f:
        json.dump(record, f)
    os.replace(temporary, path + RECORD_SUFFIX)


def check_cached(path: str, checksum: tuple[str, str] | None) -> str | None:
    """None if the cached file at path may be used, else what is wrong with it. With a checksum
    (from its name): the digest, unless the record says it was checked at this size and mtime.
    Without one: the size recorded at download."""
    st = os.stat(path)
    record = read_record(path)
    unchanged = record is not None and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns
    if checksum is not None:
        algorithm, prefix = checksum
        if unchanged and record.get("checked") == f"{algorithm}:{prefix}":
            return None
        digest = file_digest(path, algorithm)
        if not digest.startswith(prefix.lower()):
            return f"its {algorithm} is {digest}, but its name says it starts with {prefix}"
        if record is not None:
            write_record(path, record.get("url", ""), f"{algorithm}:{prefix}", True)
        return None
    if record is not None and record.get("size") != st.st_size:
        return f"it holds {st.st_size} bytes where {record.get('size')} were downloaded"
    return None


def is_unconfirmed(path: str) -> bool:
    """A cache entry that nothing has vouched for yet (no checksum; not yet read whole)."""
    record = read_record(path)
    return record is not None and not record.get("confirmed")


def confirm(path: str) -> None:
    """The weight reader read the cached file at path whole: record that."""
    record = read_record(path)
    if record is not None and not record.get("confirmed"):
        write_record(path, record.get("url", ""), record.get("checked"), True)


def is_downloaded(path: str) -> bool:
    """The file at path was put in the cache by a download (it has a record)."""
    return read_record(path) is not None


def set_aside(path: str, problem: str, again: bool = True) -> str:
    """Moves a cached file that failed a check to <path>.damaged-<time> (never deleted: it may be
    evidence, or the only copy) and says so in one line (`again`: that it is being downloaded
    again); returns where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = f"{path}.damaged-{stamp}"
    k = 1
    while os.path.exists(aside):
        aside, k = f"{path}.damaged-{stamp}-{k}", k + 1
    os.replace(path, aside)
    if os.path.exists(path + RECORD_SUFFIX):
        os.remove(path + RECORD_SUFFIX)
    logging.warning("cached %s: %s; moved it aside to %s%s", path, problem, aside,
                    " and downloading it again" if again else "")
    return aside


def remove_stale_parts(path: str) -> None:
    """Removes the temporary files of path's downloads that a killed run left: this host's whose
    process is gone, another host's untouched for a day."""
    folder, base = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith(base + ".part-"):
            continue
        match = re.fullmatch(re.escape(base) + r"\.part-(.+)-(\d+)-[0-9a-f]{8}", name)
        part = os.path.join(folder, name)
        try:
            if match and match[1] == socket.gethostname():
                if _alive(int(match[2])):
                    continue
            elif time.time() - os.path.getmtime(part) < 86400:
                continue
            os.remove(part)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
