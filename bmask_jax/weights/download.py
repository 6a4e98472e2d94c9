"""Weight files by URL, into a local cache, as a user of torch.hub or detectron2 expects:

- the cache is $BMASK_JAX_HOME/weights (default ~/.cache/bmask_jax/weights), one file per URL at
  <host>/<path of the URL>, so the publisher's file name is kept and a file found there is
  used without asking the network;
- a progress bar;
- the bytes go to a temporary name beside the target and are moved in only when the transfer is
  complete (Content-Length reached) and the checksum fits: an interrupted download is never used;
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
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid

DETECTRON2_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"
PUBLIC_FILES = "https://dl.fbaipublicfiles.com/"
_CHUNK = 1 << 20


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
    """Where the file of `url` lives in the cache: weights/<host>/<path>."""
    parsed = urllib.parse.urlparse(expand_url(url))
    parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise DownloadError(f"{url}: the URL names no file")
    host = parsed.netloc.replace(":", "_") or "local"
    return os.path.join(home(), "weights", host, *parts)


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
    mirror = os.environ.get("BMASK_JAX_MIRROR")
    if not mirror or not url.startswith(PUBLIC_FILES):
        return url
    rest = url[len(PUBLIC_FILES):]
    if "://" not in mirror:                     # a folder
        return urllib.parse.urljoin("file:", urllib.request.pathname2url(os.path.join(os.path.abspath(mirror), rest)))
    return mirror.rstrip("/") + "/" + rest


def file_digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, checksum: tuple[str, str] | None | str = "auto", progress: bool = True,
          timeout: float = 60.0) -> str:
    """The local path of `url`'s file: from the cache, else downloaded into it. checksum:
    "auto" (what the file name carries, publisher_checksum), None, or (algorithm, hex prefix)."""
    url = expand_url(url)
    path = cache_path(url)
    if os.path.isfile(path):
        return path
    if checksum == "auto":
        checksum = publisher_checksum(url)
    return download(url, path, checksum, progress, timeout)


def download(url: str, path: str, checksum: tuple[str, str] | None = None, progress: bool = True,
             timeout: float = 60.0) -> str:
    """Download `url` to `path` through a temporary file beside it; returns path."""
    source = _mirrored(url)
    by_hand = f"download {url} yourself and save it as {path}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Unique per process and host: processes of a multi-host run may share the cache folder.
    partial = f"{path}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            response = urllib.request.urlopen(urllib.request.Request(source, headers={"User-Agent": "bmask_jax"}),
                                              timeout=timeout)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"cannot download {source}: HTTP {e.code} {e.reason}; {by_hand}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"cannot download {source} (no network? {reason}); {by_hand}") from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = _copy(response, partial, total, progress, os.path.basename(path), source, by_hand)
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
        return path
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _copy(response, partial: str, total: int | None, progress: bool, name: str, source: str, by_hand: str) -> int:
    from tqdm import tqdm
    received = 0
    with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"downloading {name}", disable=not progress,
                                           dynamic_ncols=True) as bar:
        while True:
            try:
                block = response.read(_CHUNK)
            except Exception as e:  # noqa: BLE001 - http.client.IncompleteRead, a reset connection, a timeout
                raise DownloadError(f"download of {source} failed after {received} bytes ({e!r}); nothing "
                                    f"was kept. Try again, or {by_hand}") from None
            if not block:
                return received
            out.write(block)
            received += len(block)
            bar.update(len(block))

