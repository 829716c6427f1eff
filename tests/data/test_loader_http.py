"""ShardLoader sources: a local HTTP server that fails, drops and stalls; `pipe:` commands.

The server is a threaded ``http.server`` on 127.0.0.1 (port chosen by the OS) owned by each test; every handler
is bounded (a stalled response waits at most ``STALL_S`` or until the test stops the server).
"""

from __future__ import annotations

import http.server
import io
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from fastlcm import testing
from fastlcm.data import NoDataError, ShardLoader, ShardSourceError

STALL_S = 8.0
FAST = dict(http_timeout_s=0.4, http_retries=1)


def _shard_bytes(prefix: str, n: int, seed: int) -> tuple[bytes, list[str]]:
    rng = np.random.default_rng(seed)
    members, keys = [], []
    for i in range(n):
        key = f"{prefix}{i:03d}"
        members += [(f"{key}.jpg", testing.encode_image(testing.synthetic_image(rng, 40, 48)[0], "jpg")),
                    (f"{key}.txt", key.encode())]  # fmt: skip
        keys.append(key)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), keys


def cut_point(data: bytes) -> int:
    """Where "drop" and "stall_mid" cut a response: an odd byte in the middle of the members (not the padding)."""
    return (len(data.rstrip(b"\0")) // 2) | 1


def _payload(tar_bytes: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return sum(m.size for m in tar.getmembers())


class ShardServer:
    """Serves ``files`` by path with a behaviour per path: ok | 500 | flaky500 | drop | stall | stall_mid | 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                path, rng = self.path, self.headers.get("Range")
                server.log.append((path, rng))
                mode = server.modes.get(path, "404")
                data = server.files.get(path, b"")
                count = sum(1 for p, _ in server.log if p == path)
                if mode == "404":
                    return self.send_error(404)
                if mode == "500" or (mode == "flaky500" and count == 1):
                    return self.send_error(500)
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes=") :].split("-")[0])
                if mode == "stall" or (mode == "stall_mid" and start == 0):
                    body = b"" if mode == "stall" else data[: cut_point(data)]
                    self._headers(200 if start == 0 else 206, data, start)
                    self.wfile.write(body)
                    self.wfile.flush()
                    server.stop.wait(STALL_S)
                    return
                if mode == "stall_mid":  # every resume stalls too
                    self._headers(206, data, start)
                    self.wfile.flush()
                    server.stop.wait(STALL_S)
                    return
                self._headers(206 if start else 200, data, start)
                if mode == "drop" and start == 0:
                    self.wfile.write(data[: cut_point(data)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

            def _headers(self, status, data, start):
                self.send_response(status)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path: str, data: bytes, mode: str = "ok") -> str:
        self.files[path], self.modes[path] = data, mode
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requests(self, path: str) -> list[str | None]:
        return [r for p, r in self.log if p == path]


@pytest.fixture
def server():
    s = ShardServer()
    s.thread.start()
    try:
        yield s
    finally:
        s.stop.set()
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(5)


def run_all(spec, timeout_s=60.0, **kw):
    """Every sample key (batch size 1, no shuffle) and the stats; fails instead of hanging past ``timeout_s``."""
    loader = ShardLoader(spec, 1, 16, shuffle_buffer=0, pin_memory=False, **{**FAST, **kw})
    box: dict = {}

    def go():
        try:
            box["keys"] = [k for b in loader for k in b.keys]
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"loader still running after {timeout_s} s: a stalled source hung it"
    if "error" in box:
        raise box["error"]
    return box["keys"], loader.stats(), time.monotonic() - t0


def test_http_ok_with_brace_spec(server):
    a, ka = _shard_bytes("a", 3, 0)
    b, kb = _shard_bytes("b", 2, 1)
    server.add("/d/shard-00000.tar", a)
    url = server.add("/d/shard-00001.tar", b)
    keys, stats, _ = run_all(url.replace("00001", "{00000..00001}"))
    assert keys == ka + kb
    assert stats["shards_opened"] == 2 and stats["shards_failed"] == 0
    # every member byte was read; tarfile pads each archive with up to 10 KiB of zeros a reader may leave unread
    payload = sum(_payload(x) for x in (a, b))
    assert payload < stats["bytes_read"] <= len(a) + len(b)


def test_http_500_is_retried_then_skipped(server):
    a, ka = _shard_bytes("a", 3, 0)
    bad = server.add("/bad.tar", a, "500")
    good = server.add("/good.tar", a)
    keys, stats, _ = run_all([bad, good])
    assert keys == ka
    assert stats["skipped"]["source_error"] >= 1 and stats["shards_failed"] == 1
    assert 2 <= len(server.requests("/bad.tar")) <= FAST["http_retries"] + 1, "one retry, then give up"
    with pytest.raises(ShardSourceError, match="/bad.tar"):
        run_all([bad, good], on_error="raise")


def test_http_flaky_500_recovers(server):
    a, ka = _shard_bytes("a", 4, 0)
    keys, stats, _ = run_all(server.add("/flaky.tar", a, "flaky500"))
    assert keys == ka
    assert stats["shards_failed"] == 0 and stats["skipped"]["source_error"] == 0
    assert len(server.requests("/flaky.tar")) == 2


def test_http_dropped_connection_resumes_with_range(server):
    a, ka = _shard_bytes("a", 6, 0)
    keys, stats, _ = run_all(server.add("/drop.tar", a, "drop"))
    assert keys == ka, "every sample of the shard, once, after resuming"
    assert all(v == 0 for k, v in stats["skipped"].items() if k != "partial_batch")
    ranges = server.requests("/drop.tar")
    assert ranges[0] is None and f"bytes={cut_point(a)}-" in ranges[1:], f"requests were {ranges}"


def test_http_stall_times_out_retries_and_skips(server):
    a, ka = _shard_bytes("a", 3, 0)
    stall = server.add("/stall.tar", a, "stall")
    good = server.add("/good.tar", a)
    keys, stats, elapsed = run_all([stall, good], timeout_s=30)
    assert keys == ka
    assert stats["shards_failed"] == 1 and stats["skipped"]["source_error"] >= 1
    assert len(server.requests("/stall.tar")) >= 2, "the stalled source is retried"
    assert elapsed < STALL_S, "gave up on timeout, not when the server let go"


def test_http_stall_mid_shard(server):
    a, ka = _shard_bytes("a", 6, 0)
    b, kb = _shard_bytes("b", 2, 1)
    stall = server.add("/mid.tar", a, "stall_mid")
    good = server.add("/good.tar", b)
    keys, stats, elapsed = run_all([stall, good], timeout_s=30)
    assert keys[-2:] == kb and set(keys[:-2]) <= set(ka) and len(keys[:-2]) < len(ka)
    assert stats["shards_failed"] == 1
    assert any(r and r != "bytes=0-" for r in server.requests("/mid.tar")), "resume asked for a byte range"
    assert elapsed < STALL_S


def test_http_everything_fails_raises_no_data(server):
    a, _ = _shard_bytes("a", 2, 0)
    urls = [server.add("/x.tar", a, "500"), server.add("/y.tar", a, "404")]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        urls.append(f"http://127.0.0.1:{s.getsockname()[1]}/z.tar")
    with pytest.raises(NoDataError):
        run_all(urls)
    with pytest.raises(NoDataError):
        run_all(urls, epochs=None)


def _pipe_shard(tmp_path):
    data, keys = _shard_bytes("p", 3, 0)
    path = tmp_path / "p.tar"
    path.write_bytes(data)
    return path, keys


def test_pipe_reads_stdout(tmp_path):
    path, keys = _pipe_shard(tmp_path)
    got, stats, _ = run_all(f"pipe:cat {path}")
    assert got == keys and stats["shards_failed"] == 0 and stats["shards_opened"] == 1


def test_pipe_command_that_fails_without_output(tmp_path):
    path, keys = _pipe_shard(tmp_path)
    got, stats, _ = run_all(["pipe:echo oops >&2; exit 3", str(path)])
    assert got == keys and stats["shards_failed"] == 1 and stats["skipped"]["source_error"] == 1
    with pytest.raises(ShardSourceError, match="exit 3"):
        run_all(["pipe:echo oops >&2; exit 3"], on_error="raise")
    with pytest.raises(NoDataError):
        run_all("pipe:exit 1")


def test_pipe_nonzero_exit_after_a_complete_tar_is_an_error(tmp_path):
    """A non-zero exit is an error for that shard even when the tar on stdout looked complete."""
    path, keys = _pipe_shard(tmp_path)
    got, stats, _ = run_all([f"pipe:cat {path}; exit 3", str(path)])
    assert got[-3:] == keys and stats["shards_failed"] == 1 and stats["skipped"]["source_error"] == 1
    with pytest.raises(ShardSourceError, match="exit 3"):
        run_all([f"pipe:cat {path}; exit 3"], on_error="raise")
