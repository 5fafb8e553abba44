"""Shards behind a URL, against real servers the tests start on 127.0.0.1: Python's HTTP server
serving a shard folder (its request log counts what was downloaded), moto's standalone S3 server
holding a bucket (its request recorder shows the upload order), and small http.server handlers that
stop answering or refuse. Nothing is mocked: the readers go through fsspec, aiohttp and s3fs."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from a2b_dist.data import eval_batches, read_manifest
from a2b_dist.data.manifest import DataError
from a2b_dist.data.storage import CacheError, Storage, TransferError
from tests.conftest import build_shards, export_generator, make_eval_config
from tests.test_train import ACCELERATE, ENV, assert_same_weights, final_weights, free_port, run, train_cmd

ROOT = Path(__file__).resolve().parents[1]
# Credentials the S3 server accepts; they must never reach a run folder or a log.
KEY_ID, SECRET = "AKIAA2BTESTKEY0042", "a2b-secret-that-must-not-leak-7f3e9c"
BUCKET = "a2b-test-bucket"
FAST = Storage(timeout_s=1.0, retries=1, backoff_s=0.1)   # a stalled server fails in seconds


def wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")


@contextmanager
def server(cmd: list[str], port: int, log: Path, env=None):
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or ENV)
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def shard_gets(log: Path) -> list[str]:
    """Paths of the .tar files http.server answered a GET for, from its request log."""
    return [line.split('"GET ', 1)[1].split(" ", 1)[0] for line in log.read_text().splitlines()
            if '"GET ' in line and ".tar " in line]


@pytest.fixture(scope="module")
def http_data(sim_shards, tmp_path_factory):
    """(URL of sim_shards through `python -m http.server`, its request log)."""
    port, log = free_port(), tmp_path_factory.mktemp("http") / "requests.log"
    with server([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                 str(sim_shards.parent), str(port)], port, log):
        yield f"http://127.0.0.1:{port}/{sim_shards.name}", log


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(environment pointing boto at a moto S3 server with a bucket, its endpoint)."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    env = {**ENV, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    server_env = {**env, "MOTO_RECORDER_FILEPATH": str(log.parent / "recording")}   # not the working folder
    with server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log, server_env):
        saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        try:
            import fsspec
            fsspec.filesystem("s3").mkdir(BUCKET)
            yield env, endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def recorded(endpoint: str, action: str) -> list[dict]:
    """moto's request recorder: start (an empty recording), stop, or the requests recorded in order."""
    import urllib.request

    if action in ("start", "stop"):
        for step in (("reset", "start") if action == "start" else ("stop",)):
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{step}-recording",
                                                          method="POST")).read()
        return []
    text = urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording").read().decode()
    decoder, out, at = json.JSONDecoder(), [], 0
    while True:   # one JSON object per request, not always newline-separated
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return out
        entry, at = decoder.raw_decode(text, at)
        out.append(entry)


@pytest.fixture(scope="module")
def s3_data(s3, sim_shards):
    """sim_shards uploaded with `shards/build.py upload`, and the PUTs in the order the server got them."""
    env, endpoint = s3
    recorded(endpoint, "start")
    proc = subprocess.run([sys.executable, "shards/build.py", "upload", str(sim_shards), f"s3://{BUCKET}/sim"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    puts = [(r["method"], r["url"]) for r in recorded(endpoint, "log") if r["method"] in ("PUT", "POST", "DELETE")]
    recorded(endpoint, "stop")
    assert proc.returncode == 0, proc.stderr
    return f"s3://{BUCKET}/sim", env, puts


@pytest.fixture(scope="module")
def local_run(sim_shards, tmp_path_factory):
    """The reference: 8 steps trained from the local shards."""
    run_dir = tmp_path_factory.mktemp("local-run") / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "data.num_workers=1"))
    return run_dir


# Training and resuming.

@pytest.mark.parametrize("where", ["http", "s3"])
def test_training_from_a_url_equals_local_and_resumes_exactly(where, request, local_run, tmp_path):
    """The same shards read through a URL give the very weights of the local run, also when the
    run stops at step 3 and resumes (the data stream's positions are the same as for files)."""
    if where == "http":
        url, env = request.getfixturevalue("http_data")[0], ENV
    else:
        url, _, puts = request.getfixturevalue("s3_data")
        env = request.getfixturevalue("s3")[0]
    common = [f"data.root={url}", f"train.run_dir={tmp_path / 'run'}", "data.num_workers=1"]
    first = subprocess.run(train_cmd(1, *common, "--until-step", "3"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(train_cmd(1, *common), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 3" in second.stdout + second.stderr
    assert_same_weights(final_weights(local_run), final_weights(tmp_path / "run"))
    if where == "s3":   # credentials: only in the environment, never in the run folder or the logs
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                assert KEY_ID.encode() not in blob and SECRET.encode() not in blob, path
        for out in (first, second):
            assert KEY_ID not in out.stdout + out.stderr and SECRET not in out.stdout + out.stderr


def test_a_url_with_credentials_is_refused_before_anything_is_written(tmp_path):
    proc = run(train_cmd(1, "data.root=https://user:hunter2@127.0.0.1:9/sim", f"train.run_dir={tmp_path / 'run'}"),
               check=False)
    assert proc.returncode == 2 and "data.root" in proc.stderr and "environment" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("url, refused", [
    ("https://user:pw@host/data", True), ("s3://AKIA:secret@bucket/data", True),
    ("https://host/data?X-Amz-Signature=abc&X-Amz-Credential=k", True), ("https://host/data?sig=abc", True),
    ("https://host/data?token=abc", True), ("https://host/data?monkey=1", False), ("s3://bucket/data", False),
    ("gs://bucket/data", False), ("data/demo", False), ("nosuchproto://host/data", True),
])
def test_urls_that_carry_credentials_or_unknown_protocols_are_refused(url, refused):
    from a2b_dist.data.storage import check_location

    if refused:
        with pytest.raises(DataError, match="data.root") as caught:
            check_location(url, "data.root")
        assert "pw" not in str(caught.value) and "abc" not in str(caught.value)
    else:
        assert check_location(url, "data.root") == url


def test_submit_passes_a_url_through_and_checks_it(http_data, tmp_path):
    url, _ = http_data
    submit = [sys.executable, "jobs/submit.py", "--config", "configs/test.yaml", "--partition", "gpu", "--dry-run",
              "--run-dir", str(tmp_path / "run")]
    ok = subprocess.run(submit + [f"data.root={url}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"root: {url}\n" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run(submit + [f"data.root={url}-gone"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and f"{url}-gone/mixed/manifest.json not found" in bad.stderr
    assert "a folder the server serves" in bad.stderr


def test_sweep_base_config_keeps_a_url_and_checks_its_roles(http_data):
    from a2b_dist.config import load_config
    from a2b_dist.sweeps import space

    url, _ = http_data
    base = space.prepare_base(load_config("configs/test.yaml", [f"data.root={url}"]), metric="val_auc", seed=0,
                              max_steps=None)
    assert base.data.root == url
    space.check_data(base)   # mixed, healthy and val are there
    with pytest.raises(Exception, match=r"no mixed shards at .*-gone/mixed"):
        space.check_data(load_config("configs/test.yaml", [f"data.root={url}-gone"]))


# Evaluation.

@pytest.fixture(scope="module")
def local_scores(sim_shards, tmp_path_factory):
    """A tiny generator's export and its scores.csv from one process on the local test folder."""
    tmp = tmp_path_factory.mktemp("local-eval")
    gen = export_generator(tmp / "generator.pt", make_eval_config(sim_shards, tmp / "run"))
    done = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(gen), "--shards",
                           str(sim_shards / "test"), "--out", str(tmp / "local")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return gen, (tmp / "local" / "scores.csv").read_text()


@pytest.mark.parametrize("where", ["http", "s3"])
def test_evaluation_over_two_processes_reads_every_sample_once(where, request, local_scores, sim_shards, tmp_path):
    """`a2b evaluate` on 2 processes from the server scores exactly the samples (and scores) of
    one process on the local folder; from S3 both ranks share one node cache."""
    gen, scores = local_scores
    if where == "http":   # and every shard's sha256 checked once, on rank 0
        url, env, extra = request.getfixturevalue("http_data")[0], ENV, ["data.verify=sha256"]
    else:
        url, env, _ = request.getfixturevalue("s3_data")
        extra = [f"data.cache_dir={tmp_path / 'cache'}"]
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(free_port()), "-m", "a2b_dist.evaluate"]
    two = subprocess.run(launch + ["--checkpoint", str(gen), "--shards", f"{url}/test", "--out", str(tmp_path / "two"),
                                   "data.num_workers=1", *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["counts"]["samples"] == metrics["counts"]["manifest"] == 80
    assert (tmp_path / "two" / "scores.csv").read_text() == scores
    if where == "s3":
        manifest = read_manifest(sim_shards / "test")
        assert sorted(p.name for p in (tmp_path / "cache" / "verified").glob("*.tar")) == sorted(
            f"{s['sha256']}.tar" for s in manifest["shards"])
        assert not list((tmp_path / "cache").glob("*.part-*"))


def test_the_cache_serves_the_second_pass(http_data, sim_shards, tmp_path):
    url, log = http_data
    storage = Storage(cache_dir=str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / f"{'0' * 64}.tar.part-killed"   # left by a process that died mid-download
    stale.write_bytes(b"half")

    def one_pass() -> list[str]:
        return [k for b in eval_batches(f"{url}/test", batch_size=16, storage=storage, num_workers=2) for k in b["key"]]

    before = len(shard_gets(log))
    first = one_pass()
    downloaded = shard_gets(log)[before:]
    assert sorted(downloaded) == sorted(f"/sim/test/{s['name']}" for s in read_manifest(sim_shards / "test")["shards"])
    second = one_pass()
    assert shard_gets(log)[before + len(downloaded):] == []   # no shard fetched again
    assert first == second and len(set(first)) == 80
    assert not stale.exists()   # no process held its lock


def test_the_cache_keeps_to_its_size_cap(http_data, tmp_path):
    url, _ = http_data
    shards = read_manifest(f"{url}/test", storage=Storage())["shards"]
    cap = max(s["bytes"] for s in shards) + 10
    storage = Storage(cache_dir=str(tmp_path / "cache"), cache_bytes=cap)
    keys = [k for b in eval_batches(f"{url}/test", batch_size=16, storage=storage) for k in b["key"]]
    assert len(keys) == 80
    held = list((tmp_path / "cache" / "verified").glob("*.tar"))
    assert sum(p.stat().st_size for p in held) <= cap and held


# Checks on open.

def test_remote_manifest_checks_sizes_and_sha256_on_demand(sim_shards, local_scores, tmp_path):
    """A shard rewritten on the server with its size unchanged passes the size check and is caught
    by data.verify=sha256, which reads it once (on 2 processes: rank 0 reads, both ranks stop with
    its message); a shard that is gone is named by its URL."""
    copy = tmp_path / "served" / "sim"
    shutil.copytree(sim_shards, copy)
    shard = copy / "test" / "test-000001.tar"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    val = copy / "val" / "val-000000.tar"   # a tar header overwritten, the size unchanged
    blob = bytearray(val.read_bytes())
    blob[:512] = b"\xff" * 512
    val.write_bytes(bytes(blob))
    port, log = free_port(), tmp_path / "requests.log"
    with server([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(copy.parent),
                 str(port)], port, log):
        url = f"http://127.0.0.1:{port}/sim"
        assert read_manifest(f"{url}/test", verify="count")["samples"] == 80
        with pytest.raises(DataError, match=r"test-000001\.tar: sha256 differs"):
            read_manifest(f"{url}/test", verify="sha256")
        assert read_manifest(f"{url}/healthy", verify="sha256")["samples"] == 80
        with pytest.raises(DataError, match=r"val-000000\.tar: unreadable tar"):
            read_manifest(f"{url}/val", verify="sha256")
        launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--main_process_port", str(free_port()), "-m", "a2b_dist.evaluate"]
        two = subprocess.run(launch + ["--checkpoint", str(local_scores[0]), "--shards", f"{url}/test", "--out",
                                       str(tmp_path / "eval"), "data.verify=sha256"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert two.returncode != 0 and "test-000001.tar: sha256 differs" in two.stderr, two.stderr[-3000:]
        assert not (tmp_path / "eval" / "metrics.json").exists()
        (copy / "healthy" / "healthy-000002.tar").unlink()
        with pytest.raises(DataError, match=rf"{url}/healthy/healthy-000002\.tar: shard listed in .* is missing"):
            read_manifest(f"{url}/healthy")
        proc = run(train_cmd(1, f"data.root={url}", f"train.run_dir={tmp_path / 'run'}"), check=False)
        assert proc.returncode == 2 and "healthy-000002.tar" in proc.stderr and "missing" in proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr     # one line, no traceback
        assert not (tmp_path / "run").exists()


def test_a_missing_object_in_the_bucket_is_named(s3, sim_shards):
    import fsspec

    env, _ = s3
    proc = subprocess.run([sys.executable, "shards/build.py", "upload", str(sim_shards), f"s3://{BUCKET}/gone"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fsspec.filesystem("s3").rm_file(f"{BUCKET}/gone/val/val-000000.tar")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/gone/val/val-000000\.tar: shard listed in .* is missing"):
        read_manifest(f"s3://{BUCKET}/gone/val", storage=FAST)
    assert read_manifest(f"s3://{BUCKET}/gone/test", storage=FAST)["samples"] == 80


def test_a_manifest_cannot_name_a_file_outside_its_role_folder(sim_shards, tmp_path):
    role = tmp_path / "test"
    shutil.copytree(sim_shards / "test", role)
    manifest = json.loads((role / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../etc/passwd"
    (role / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards\[0\]\.name '\.\./\.\./etc/passwd' must be a file name"):
        read_manifest(role)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, but stalls after half of any shard named in ``stall`` (only its first GET
    with ``once``) and answers 403 for files named in ``deny``."""
    stall: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    once = False
    stalled: set = set()
    release = threading.Event()

    gets: list = []   # every GET's path, in order

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.gets.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.deny:
            self.send_error(403)
            return
        if name not in self.stall or (self.once and name in self.stalled):
            return super().do_GET()
        self.stalled.add(name)
        blob = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob[: len(blob) // 2])
        self.wfile.flush()
        self.release.wait(60)   # stops answering, the connection open


@contextmanager
def faulty_server(folder: Path, stall=(), deny=(), once=False, gets: list | None = None):
    """The URL of an in-process http.server over ``folder``; ``gets`` receives every GET's path."""
    handler = type("Handler", (_Handler,), {"stall": tuple(stall), "deny": tuple(deny), "once": once,
                                            "stalled": set(), "release": threading.Event(),
                                            "gets": [] if gets is None else gets})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


def bounded(fn, seconds: float = 120):
    """fn() in a thread: a hang fails the test instead of stalling the suite."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=seconds)


def test_a_server_that_stops_answering_fails_within_the_timeout(sim_shards, tmp_path):
    """Half a shard, then silence: the read times out, is retried, and fails naming the URL; with
    the cache on, the half-downloaded shard is not left in it."""
    name = read_manifest(sim_shards / "test")["shards"][0]["name"]
    with faulty_server(sim_shards.parent, stall=[name]) as base:
        def read(storage):
            return [k for b in eval_batches(f"{base}/sim/test", batch_size=16, storage=storage) for k in b["key"]]

        def expect_timeout(storage):
            with pytest.raises(TransferError) as caught:
                read(storage)
            return str(caught.value)
        message = bounded(lambda: expect_timeout(FAST))
        assert f"{base}/sim/test/{name}" in message and "no answer within data.timeout_s=1 s" in message
        assert "after 2 attempts" in message
        cache = tmp_path / "cache"
        message = bounded(lambda: expect_timeout(Storage(timeout_s=1.0, retries=1, backoff_s=0.1, cache_dir=str(cache))))
        assert "downloading failed after 2 attempts" in message
        assert not list(cache.rglob("*.tar")) and not list(cache.glob("*.part-*"))


def test_a_stream_that_stalls_once_is_reopened_and_each_sample_read_once(sim_shards):
    """The first GET of a shard stops after half of it; the retry reads past the samples already
    delivered, so the pass is the local one, every sample once, in the same order."""
    local = [k for b in eval_batches(sim_shards / "test", batch_size=16) for k in b["key"]]
    names = [s["name"] for s in read_manifest(sim_shards / "test")["shards"]]
    with faulty_server(sim_shards.parent, stall=names, once=True) as base:
        keys = bounded(lambda: [k for b in eval_batches(f"{base}/sim/test", batch_size=16, storage=FAST)
                                for k in b["key"]])
    assert keys == local and len(set(keys)) == 80


def test_a_server_that_never_answers_and_a_refusal(sim_shards):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)   # connections are accepted by the kernel and never answered
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/sim/test"
        with pytest.raises(TransferError, match=r"manifest\.json: reading failed after 2 attempts: no answer"):
            bounded(lambda: read_manifest(url, storage=FAST))
    finally:
        silent.close()
    with faulty_server(sim_shards.parent, deny=["manifest.json"]) as base:
        with pytest.raises(TransferError, match=r"access denied \(HTTP 403\); check the credentials") as caught:
            bounded(lambda: read_manifest(f"{base}/sim/test", storage=FAST))
        assert "after" not in str(caught.value)   # a refusal is not retried


# Uploading.

def test_upload_sends_every_manifest_after_its_shards(s3_data, sim_shards):
    url, _, puts = s3_data
    for role in ("healthy", "mixed", "val", "test"):
        order = [u for m, u in puts if m == "PUT" and f"/sim/{role}/" in u]
        names = [u.rsplit("/", 1)[-1] for u in order]
        shards = sorted(s["name"] for s in read_manifest(sim_shards / role)["shards"])
        assert sorted(names[:-1]) == shards and names[-1] == "manifest.json", names
    assert read_manifest(f"{url}/test", verify="sha256")["samples"] == 80


def test_upload_checks_the_build_first_and_build_out_a_url(s3, sim_shards, tmp_path):
    env, endpoint = s3
    damaged = tmp_path / "damaged"
    shutil.copytree(sim_shards, damaged)
    with open(damaged / "test" / "test-000000.tar", "r+b") as f:
        f.truncate(1000)
    recorded(endpoint, "start")
    proc = subprocess.run([sys.executable, "shards/build.py", "upload", str(damaged), f"s3://{BUCKET}/damaged"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    sent = [r for r in recorded(endpoint, "log") if r["method"] == "PUT"]
    recorded(endpoint, "stop")
    assert proc.returncode == 2 and "test-000000.tar" in proc.stderr and not sent
    out = f"s3://{BUCKET}/built"
    proc = build_shards("simulated", "--source", "mnist5k", "--size", "32", "--scale", "0.02", "--seed", "1",
                        "--out", out, env=env)
    assert f"{out}/test: " in proc.stdout
    check = subprocess.run([sys.executable, "shards/build.py", "verify", out], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.count(": ok,") == 4, check.stdout + check.stderr
    again = subprocess.run([sys.executable, "shards/build.py", "simulated", "--source", "mnist5k", "--size", "32",
                            "--scale", "0.02", "--out", out], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_a_missing_filesystem_package_names_its_extra(tmp_path):
    code = ("import sys\nsys.modules['s3fs'] = None\nfrom a2b_dist.cli import main\n"
            f"sys.exit(main(['train', '--config', 'configs/test.yaml', 'data.root=s3://{BUCKET}/sim', "
            f"'train.run_dir={tmp_path / 'run'}']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pip install 'a2b_dist[s3]'" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0


# The node cache trusts only bytes it has hashed.

def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A command's answer to bad input: exit 2, no traceback, one `error:` line naming things."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_a_server_that_sends_other_bytes_cannot_poison_the_cache(sim_shards, local_scores, tmp_path):
    """A server that sends other bytes of the same size (one byte flipped) gets a one-line error
    naming the URL and both hashes, downloaded once (not retried), and nothing of it stays in the
    cache; a poisoned file that an older cache kept under the bare `<sha256>.tar` (size-checked
    only) is never read; a later good server fills the cache, and the second pass reads it."""
    good, bad = tmp_path / "good" / "sim", tmp_path / "bad" / "sim"
    for served in (good, bad):
        shutil.copytree(sim_shards / "test", served / "test")
    shards = read_manifest(sim_shards / "test")["shards"]
    target = shards[1]
    blob = bytearray((bad / "test" / target["name"]).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "test" / target["name"]).write_bytes(bytes(blob))
    received = sha256_of(bad / "test" / target["name"])
    cache = tmp_path / "cache"
    cache.mkdir()
    legacy = cache / f"{target['sha256']}.tar"   # an older cache's copy: right size, poisoned bytes
    shutil.copy(bad / "test" / target["name"], legacy)
    storage = Storage(timeout_s=5.0, retries=2, backoff_s=0.1, cache_dir=str(cache))
    local = [k for b in eval_batches(sim_shards / "test", batch_size=16) for k in b["key"]]

    def keys(base: str) -> list[str]:
        return [k for b in eval_batches(f"{base}/sim/test", batch_size=16, storage=storage) for k in b["key"]]

    def verified() -> dict[str, str]:
        """name -> sha256 of the bytes, of every file the cache would read."""
        return {p.name: sha256_of(p) for p in (cache / "verified").glob("*")}

    bad_gets: list[str] = []
    with faulty_server(bad.parent, gets=bad_gets) as base:
        url = f"{base}/sim/test/{target['name']}"
        with pytest.raises(DataError) as caught:
            bounded(lambda: keys(base))
        message = str(caught.value)
        assert url in message and target["sha256"] in message and received in message and "\n" not in message
        assert "nothing was cached" in message
        assert bad_gets.count(f"/sim/test/{target['name']}") == 1   # a wrong hash is not retried
        # data.verify=sha256 through the cache names the server's bytes, and caches nothing of them
        with pytest.raises(DataError, match=rf"{target['name']}: the server sent bytes with sha256 {received}"):
            bounded(lambda: read_manifest(f"{base}/sim/test", verify="sha256", storage=storage))
        # the CLI: one line, no output
        proc = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(local_scores[0]),
                               "--shards", f"{base}/sim/test", "--out", str(tmp_path / "eval"),
                               f"data.cache_dir={cache}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        one_line_error(proc, url, target["sha256"], received)
        assert not (tmp_path / "eval" / "metrics.json").exists()
    assert f"{target['sha256']}.tar" not in verified()
    assert all(name == f"{digest}.tar" for name, digest in verified().items())
    assert not list(cache.glob("*.part-*"))

    good_gets: list[str] = []
    with faulty_server(good.parent, gets=good_gets) as base:
        assert bounded(lambda: keys(base)) == local
        downloaded = [g for g in good_gets if g.endswith(".tar")]
        assert f"/sim/test/{target['name']}" in downloaded   # the legacy copy was not trusted
        assert bounded(lambda: keys(base)) == local
        assert [g for g in good_gets if g.endswith(".tar")] == downloaded   # the second pass: from the cache
    assert verified() == {f"{s['sha256']}.tar": s["sha256"] for s in shards}
    assert not legacy.exists()


# Shard names from a served manifest.

@pytest.mark.parametrize("name, ok", [
    ("healthy-000000.tar", True), ("a_b.c-1.tar", True),
    ("../x.tar", False), ("..%2Fx.tar", False), ("..%252Fx.tar", False), ("%2e%2e%2fx.tar", False),
    ("..%5Cx.tar", False), ("a/b.tar", False), ("a\\b.tar", False), (".hidden.tar", False), ("..", False),
    ("", False), ("x%00.tar", False), ("a b.tar", False), ("x" * 300, False),
])
def test_shard_names_are_checked_after_decoding_against_an_allow_list(name, ok):
    from a2b_dist.data.manifest import check_shard_name

    if ok:
        assert check_shard_name("m.json", 0, name) == name
    else:
        with pytest.raises(DataError, match=r"m\.json: shards\[0\]\.name .* must be a file name"):
            check_shard_name("m.json", 0, name)


@pytest.mark.parametrize("name", ["..%2Ftest%2Ftest-000000.tar", "..%252Ftest%252Ftest-000000.tar"])
def test_a_served_manifest_cannot_point_a_role_at_another_roles_shard(name, sim_shards, tmp_path):
    """The healthy role's manifest names the test role's shard, percent-encoded (once and twice),
    with that shard's true size, count and hash: training and verify refuse it in one line, and
    the server is never asked for it."""
    served = tmp_path / "served" / "sim"
    shutil.copytree(sim_shards, served)
    manifest = json.loads((served / "healthy" / "manifest.json").read_text())
    manifest["shards"][0] = dict(read_manifest(sim_shards / "test")["shards"][0], name=name)
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
    (served / "healthy" / "manifest.json").write_text(json.dumps(manifest))
    gets: list[str] = []
    with faulty_server(served.parent, gets=gets) as base:
        url = f"{base}/sim"
        with pytest.raises(DataError, match=r"shards\[0\]\.name .* must be a file name"):
            read_manifest(f"{url}/healthy")
        proc = run(train_cmd(1, f"data.root={url}", f"train.run_dir={tmp_path / 'run'}"), check=False)
        one_line_error(proc, f"{url}/healthy/manifest.json", f"shards[0].name {name!r}", "must be a file name")
        assert not (tmp_path / "run").exists()
        check = subprocess.run([sys.executable, "shards/build.py", "verify", url], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
    assert check.returncode == 1, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert f"{url}/healthy: DAMAGED (1 problem)" in lines, lines
    assert any("shards[0].name" in line and "must be a file name" in line for line in lines), lines
    assert check.stdout.count(": ok,") == 3   # the other roles
    assert not [g for g in gets if g.endswith(".tar") and "test" in g.split("/")[-1] and "/test/" not in g], gets
    assert not [g for g in gets if "%" in g], gets


# Every location a command takes goes through one check.

def test_every_command_refuses_credentials_in_a_location_without_echoing_them(http_data, sim_shards, tmp_path):
    """A live server behind the URL: each command refuses the user:password@ URL in one line, the
    password never printed, and the server is never asked."""
    url, log = http_data
    secret = "pa55word-must-not-leak"
    bad = url.replace("http://", f"http://user:{secret}@")
    cli = [sys.executable, "-m", "a2b_dist.cli"]
    commands = [
        ([sys.executable, "shards/build.py", "verify", bad], "verify DIR"),
        ([sys.executable, "shards/build.py", "upload", str(sim_shards), bad], "upload URL"),
        ([sys.executable, "shards/build.py", "folder", "--images", bad, "--role", "healthy", "--out",
          str(tmp_path / "built"), "--size", "32", "--channels", "1"], "--images"),
        ([sys.executable, "shards/build.py", "simulated", "--source", "mnist5k", "--size", "32", "--out", bad], "--out"),
        (cli + ["evaluate", "--checkpoint", str(tmp_path / "gen.pt"), "--shards", f"{bad}/test", "--out",
                str(tmp_path / "eval")], "--shards"),
        (cli + ["evaluate", "--checkpoint", f"{bad}/gen.pt", "--shards", str(sim_shards / "test"), "--out",
                str(tmp_path / "eval")], "--checkpoint"),
        (cli + ["detect", "--checkpoint", str(tmp_path / "gen.pt"), "--images", bad, "--out", str(tmp_path / "det")],
         "--images"),
        (cli + ["export", f"{bad}/run", str(tmp_path / "gen.pt")], "checkpoint"),
        (cli + ["train", "--config", "configs/test.yaml", f"data.root={bad}", f"train.run_dir={tmp_path / 'run'}"],
         "data.root"),
        (cli + ["train", "--config", "configs/test.yaml", f"data.root={sim_shards}", f"train.run_dir={tmp_path / 'run'}",
                "--resume", f"{bad}/run"], "--resume"),
        ([sys.executable, "jobs/submit.py", "--config", "configs/test.yaml", "--partition", "gpu", "--dry-run",
          "--run-dir", str(tmp_path / "run"), f"data.root={bad}"], "data.root"),
    ]
    before = len(log.read_text().splitlines())
    for cmd, names in commands:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert secret not in proc.stdout + proc.stderr, (cmd, proc.stdout, proc.stderr)
        one_line_error(proc, names, "user:password@")
    assert log.read_text().splitlines()[before:] == []   # not one request reached the server
    assert not [p for p in tmp_path.iterdir()]


# Faults of the node's cache folder (not the server's).

def unusable_cache(kind: str, tmp_path: Path) -> Path:
    """A data.cache_dir that cannot hold the cache."""
    if kind == "a file":
        (tmp_path / "cache").write_text("not a folder")
        return tmp_path / "cache"
    if kind == "under a file":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file" / "cache"
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    if os.access(cache, os.W_OK):
        pytest.skip("this user (root) may write a read-only folder; 'a file' and 'under a file' cover the same path")
    return cache


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only"])
def test_a_cache_folder_that_cannot_be_written_is_named_at_once(kind, http_data, tmp_path):
    """Named as data.cache_dir, not retried, not blamed on credentials, before any download."""
    url, log = http_data
    cache = unusable_cache(kind, tmp_path)
    before = len(shard_gets(log))
    storage = Storage(timeout_s=5.0, retries=3, backoff_s=0.1, cache_dir=str(cache))
    with pytest.raises(CacheError) as caught:
        bounded(lambda: list(eval_batches(f"{url}/test", batch_size=16, storage=storage)))
    message = str(caught.value)
    assert message.startswith(f"data.cache_dir={cache}: the node's shard cache cannot be written"), message
    assert "credentials" not in message and "attempts" not in message and "\n" not in message
    assert shard_gets(log)[before:] == []


def test_training_with_an_unusable_cache_stops_before_the_run_folder(http_data, tmp_path):
    url, _ = http_data
    cache = unusable_cache("under a file", tmp_path)
    proc = run(train_cmd(1, f"data.root={url}", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={cache}"),
               check=False)
    one_line_error(proc, f"data.cache_dir={cache}", "Not a directory")
    assert "credentials" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_full_cache_disk_is_one_line_not_retried(http_data, sim_shards, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG where a full disk gives ENOSPC)
    below the smallest shard: the first download fails writing the cache, once, in one line naming
    data.cache_dir; nothing stays in the cache."""
    import resource
    import signal

    url, log = http_data
    limit = min(s["bytes"] for s in read_manifest(sim_shards / "test")["shards"]) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cache = tmp_path / "cache"
    code = ("import sys\nfrom a2b_dist.data import eval_batches\nfrom a2b_dist.data.storage import Storage\n"
            "from a2b_dist.errors import run_guarded\n"
            "def main(argv):\n"
            "    storage = Storage(timeout_s=5.0, retries=3, backoff_s=0.1, cache_dir=argv[1])\n"
            "    for _ in eval_batches(argv[0], batch_size=16, storage=storage):\n"
            "        pass\n"
            "sys.exit(run_guarded(main, sys.argv[1:]))\n")
    before = len(shard_gets(log))
    proc = subprocess.run([sys.executable, "-c", code, f"{url}/test", str(cache)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=small_files, env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    one_line_error(proc, f"data.cache_dir={cache}", "File too large")
    assert "credentials" not in proc.stderr and "attempts" not in proc.stderr
    gets = shard_gets(log)[before:]
    assert len(gets) == 1, gets   # one download, not retried
    assert not list(cache.rglob("*.tar")) and not list(cache.glob("*.part-*"))
