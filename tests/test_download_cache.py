"""Downloads that end and a cache that checks what it holds (weights/download.py), against an
HTTP server on 127.0.0.1 that drips, stalls, cuts, leaves out or understates its
Content-Length: every test starts its own server and $BMASK_JAX_HOME."""
import hashlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import file_server as server, weights_home as cache  # noqa: F401 - fixtures

from bmask_jax.weights import download, pretrained
from bmask_jax.weights.errors import DamagedWeightsError, UnsafeCheckpointError, WeightImportError

pytestmark = pytest.mark.usefixtures("cache")     # every test: its own empty $BMASK_JAX_HOME, no mirror


def files_in(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def checkpoint_bytes(seed=0, n=50_000) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({"model": {"w": rng.normal(size=n).astype(np.float32)}, "__author__": "test"})


def md5_named(server, body, folder="X/1") -> str:
    """Serves body under a detectron2 model-zoo path whose name carries its md5 prefix; returns the URL
    (through $BMASK_JAX_MIRROR, as the zoo's own files are fetched)."""
    name = f"/detectron2/{folder}/model_final_{hashlib.md5(body).hexdigest()[:6]}.pkl"
    server.files[name] = body
    return "detectron2://" + name[len("/detectron2/"):]


# ---------------------------------------------------------------------------------------------
# Downloads end
# ---------------------------------------------------------------------------------------------

def test_a_drip_is_stopped_by_the_rate_window_with_the_bytes_counted(server, cache):
    server.files["/m.pkl"] = b"x" * 400
    server.how["/m.pkl"] = {"drip": 0.05}
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"stalled: (\d+) bytes in the last 1 s \(\1 in all\)") as e:
        download.fetch(server.url + "/m.pkl", progress=False, timeout=5, stall_s=1.0, min_bytes=1000)
    assert time.monotonic() - start < 4                 # the drip alone would take 20 s
    got = int(str(e.value).split("stalled: ")[1].split(" ")[0])
    assert 5 <= got <= 40                                # what arrived, not 0
    assert files_in(cache) == []


def test_a_silent_server_fails_with_the_bytes_it_sent(server, cache):
    server.files["/m.pkl"] = b"y" * 1000
    server.how["/m.pkl"] = {"stall_after": 50, "stall_s": 5}
    with pytest.raises(download.DownloadError, match=r"failed after 50 bytes .*timed out"):
        download.fetch(server.url + "/m.pkl", progress=False, timeout=0.5)
    assert files_in(cache) == []


def test_a_killed_runs_part_file_is_removed_by_the_next_start(server, cache):
    url = server.url + "/m.pkl"
    server.files["/m.pkl"] = b"z" * 100
    path = download.cache_path(url)
    os.makedirs(os.path.dirname(path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    killed = f"{path}.part-{host}-{dead}-0123abcd"
    running = f"{path}.part-{host}-{os.getpid()}-4567abcd"        # a download under way in this process
    other_host = f"{path}.part-elsewhere-1-89abcdef"
    for name in (killed, running, other_host):
        open(name, "wb").write(b"half")
    assert open(download.fetch(url, progress=False), "rb").read() == b"z" * 100
    assert not os.path.exists(killed)
    assert os.path.exists(running) and os.path.exists(other_host)   # another host's: a day's grace
    os.utime(other_host, (time.time() - 2 * 86400,) * 2)
    download.remove_stale_parts(path)
    assert not os.path.exists(other_host)


def test_a_transfer_without_length_is_kept_only_when_the_read_confirms_it(server, cache, caplog):
    body = checkpoint_bytes()
    server.files["/w.pkl"] = body
    server.how["/w.pkl"] = {"length": None, "cut": len(body) // 2, "times": 1}     # cut once, no length
    url = server.url + "/w.pkl"
    path = download.fetch(url, progress=False)
    assert download.is_unconfirmed(path)                  # no checksum and no length: not trusted yet
    with caplog.at_level(logging.WARNING):
        got_path, arrays = pretrained.read_weights(url, progress=False)
    assert got_path == path and arrays["w"].shape == (50_000,)
    assert not download.is_unconfirmed(path)
    assert len(server.requests) == 2                      # read, failed, set aside, downloaded again
    aside = [f for f in files_in(cache) if ".damaged-" in f]
    assert len(aside) == 1 and os.path.getsize(os.path.join(cache, aside[0])) == len(body) // 2
    assert "cut short or damaged" in caplog.text and "downloading it again" in caplog.text


def test_a_body_longer_than_its_content_length_is_caught_by_the_read(server, cache):
    body = checkpoint_bytes(1)
    server.files["/w.pkl"] = body
    server.how["/w.pkl"] = {"length": len(body) - 5000, "times": 2}       # every try is short
    url = server.url + "/w.pkl"
    with pytest.raises(DamagedWeightsError, match="cut short or damaged"):
        pretrained.read_weights(url, progress=False)
    # Both tries were set aside: nothing damaged stays where the next run would take it.
    assert not os.path.exists(download.cache_path(url))
    assert len([f for f in files_in(cache) if ".damaged-" in f]) == 2
    pretrained.read_weights(url, progress=False)          # the server mends: the third try is whole


# ---------------------------------------------------------------------------------------------
# The cache checks what it holds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "replace"])
def test_a_damaged_cache_entry_is_set_aside_and_downloaded_again(server, cache, monkeypatch, caplog, damage):
    monkeypatch.setenv("BMASK_JAX_MIRROR", server.url)
    body = checkpoint_bytes(2)
    url = md5_named(server, body)
    path = download.fetch(url, progress=False)
    if damage == "truncate":
        os.truncate(path, 1000)
    elif damage == "garbage":        # the same size: only the checksum can tell
        data = bytearray(open(path, "rb").read())
        data[5000:5100] = os.urandom(100)
        open(path, "wb").write(bytes(data))
    else:                            # another valid checkpoint under this name
        open(path, "wb").write(checkpoint_bytes(3))
    with caplog.at_level(logging.WARNING):
        again = download.fetch(url, progress=False)
    assert again == path and open(path, "rb").read() == body
    assert len(server.requests) == 2
    assert len([line for line in caplog.text.splitlines() if "moved it aside" in line]) == 1
    assert path in caplog.text and "downloading it again" in caplog.text
    assert len([f for f in files_in(cache) if ".damaged-" in f]) == 1


def test_an_unchanged_entry_is_not_hashed_again(server, cache, monkeypatch):
    monkeypatch.setenv("BMASK_JAX_MIRROR", server.url)
    url = md5_named(server, checkpoint_bytes(4))
    path = download.fetch(url, progress=False)
    with monkeypatch.context() as m:
        m.setattr(download, "file_digest", lambda *a: pytest.fail("hashed a file the record vouches for"))
        assert download.fetch(url, progress=False) == path
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))   # touched: the record no longer vouches
    hashed = []
    real = download.file_digest
    monkeypatch.setattr(download, "file_digest", lambda *a: hashed.append(a) or real(*a))
    assert download.fetch(url, progress=False) == path and len(hashed) == 1
    assert len(server.requests) == 1


def test_a_file_saved_by_hand_that_fails_its_checksum_is_refused(server, cache, monkeypatch):
    monkeypatch.setenv("BMASK_JAX_MIRROR", server.url)
    body = checkpoint_bytes(5)
    url = md5_named(server, body)
    path = download.cache_path(url)
    os.makedirs(os.path.dirname(path))
    open(path, "wb").write(checkpoint_bytes(6))            # not the file the name promises
    prefix = hashlib.md5(body).hexdigest()[:6]
    with pytest.raises(download.DownloadError) as e:
        download.fetch(url, progress=False)
    message = str(e.value)
    assert path in message and f"starts with {prefix}" in message and len(message.splitlines()) == 1
    assert server.requests == [] and os.path.exists(path)   # the user's file: left as it is


def test_a_size_check_without_checksum(server, cache):
    server.files["/plain.pkl"] = checkpoint_bytes(7)
    url = server.url + "/plain.pkl"
    path = download.fetch(url, progress=False)
    os.truncate(path, 100)
    assert open(download.fetch(url, progress=False), "rb").read() == server.files["/plain.pkl"]
    assert len(server.requests) == 2


def test_an_unsafe_pickle_is_set_aside_and_never_kept(server, cache):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    server.files["/evil.pkl"] = pickle.dumps({"model": {"w": Evil()}})
    url = server.url + "/evil.pkl"
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        pretrained.read_weights(url, progress=False)
    assert len(server.requests) == 2                         # refused, set aside, fetched again, refused
    assert not os.path.exists(download.cache_path(url))
    assert len([f for f in files_in(cache) if ".damaged-" in f]) == 2


# ---------------------------------------------------------------------------------------------
# Cache paths and keys
# ---------------------------------------------------------------------------------------------

def test_cache_keys_and_paths_stay_inside_the_cache(cache, tmp_path, monkeypatch):
    a, b = download.cache_path("http://h/m.pkl?v=1"), download.cache_path("http://h/m.pkl?v=2")
    assert a != b and os.path.basename(a) == os.path.basename(b) == "m.pkl"
    assert download.cache_path("http://h/m.pkl") not in (a, b)
    inside = os.path.realpath(cache / "weights") + os.sep
    kept = {"http://a/../../x.pkl", "http://a/%2e%2e/%2E%2E/x.pkl", "http://a/b/..%2f..%2fx.pkl",
            "http://user:secret@a/x.pkl", "http://[::1]:8000/x.pkl", "https://a.b.example:443/./x.pkl"}
    refused = {"http://../x.pkl", "http://%2e%2e/x.pkl", "http:///x.pkl", "http://a:notaport/x.pkl"}
    for url in sorted(kept | refused):
        try:
            path = download.cache_path(url)
        except download.DownloadError as e:
            assert url in refused and url in str(e) and len(str(e).splitlines()) == 1, (url, e)
            continue
        assert url in kept, (url, path)
        assert os.path.realpath(path).startswith(inside) and os.path.basename(path) == "x.pkl", (url, path)
        assert "secret" not in path
    assert "::1" not in download.cache_path("http://[::1]:8000/x.pkl")
    mirror = tmp_path / "mirror"
    (mirror / "detectron2").mkdir(parents=True)
    (tmp_path / "secret.pkl").write_bytes(b"secret")
    for rest in ("detectron2/../../secret.pkl", "detectron2/%2e%2e/%2e%2e/secret.pkl"):
        for where in (str(mirror), "http://127.0.0.1:1/mirror"):
            monkeypatch.setenv("BMASK_JAX_MIRROR", where)
            with pytest.raises(download.DownloadError, match="mirror"):
                download.fetch("https://dl.fbaipublicfiles.com/" + rest, progress=False)
    os.symlink(tmp_path / "secret.pkl", mirror / "detectron2" / "link.pkl")     # a link out of the folder
    monkeypatch.setenv("BMASK_JAX_MIRROR", str(mirror))
    with pytest.raises(download.DownloadError, match="outside the mirror folder"):
        download.fetch("https://dl.fbaipublicfiles.com/detectron2/link.pkl", progress=False)
    assert "secret" not in " ".join(files_in(cache))


def test_a_pth_whose_tensor_claims_more_than_its_storage_is_refused_small(tmp_path):
    """A 410-byte-class torch zip whose one tensor claims 7.5e8 elements over a 1-element
    storage with stride 0: refused from its geometry, without the 3 GB copy."""
    import io
    import zipfile

    import resource
    from bmask_jax.weights.safe_pickle import read_checkpoint
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    t = torch.zeros(1).expand(750_000_000)        # a stride-0 view: torch.save keeps the 1-element storage
    torch.save({"w": t}, buffer)
    path = tmp_path / "bomb.pth"
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 2000 and zipfile.is_zipfile(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightImportError, match=r"750000000 elements\) over storage .* of 1 elements"):
        read_checkpoint(str(path))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000     # KiB: under 200 MB
