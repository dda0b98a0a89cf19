"""The streaming loader over a real web server (Debian's nginx on 127.0.0.1): the same batches
over http://, pipe:curl and local paths; equal batch counts per rank; exact resume; and the
failures a network gives (a shard that answers 404, a connection dropped mid-shard, a
truncated file), each retried and then reported with its URL."""
from __future__ import annotations

import http.server
import io
import math
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sf2dist.data import make_loader, read_manifest, synth
from sf2dist.data.loader import _FLIP, _key, _mix
from sf2dist.data.shards import load_index
from sf2dist.data.stream import (RankStream, ShardReadError, _tar_members, is_stream_source, manifest_location,
                                 open_stream_source)
from sf2dist.imageio import decode_image

ROOT = Path(__file__).resolve().parent.parent
NGINX_SH = ROOT / "tests" / "nginx.sh"
SHARD_SIZE = 16
NUM_SHARDS = 7  # 100 samples: 6 shards of 16 and one of 4
BROKEN = "shard-000002.tar"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A converted set: 20 sf2dist-synth identities x 5 images of 16x16 in 7 shards."""
    out = tmp_path_factory.mktemp("stream") / "synth"
    synth.generate(out, identities=20, images_per_identity=5, holdout_identities=0, pairs=0, size=16, seed=5,
                   shard_size=SHARD_SIZE, workers=0)
    return out / "train"


@pytest.fixture(scope="module")
def served(shards, tmp_path_factory):
    """nginx serving `good/` (the set), `missing/` (without BROKEN: 404) and `truncated/` (BROKEN cut in half)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (tests/nginx.sh and the pipe:curl tests use it)")
    root = tmp_path_factory.mktemp("www")
    for name in ("good", "missing", "truncated"):
        shutil.copytree(shards, root / name)
    (root / "missing" / BROKEN).unlink()
    data = (root / "truncated" / BROKEN).read_bytes()
    (root / "truncated" / BROKEN).write_bytes(data[: len(data) // 2])
    port = free_port()
    up = subprocess.run(["bash", str(NGINX_SH), "up", str(root), str(port)], capture_output=True, text=True,
                        timeout=300)
    if up.returncode != 0:
        pytest.skip(f"nginx could not be started (tests/nginx.sh up: exit {up.returncode}): "
                    f"{(up.stderr or up.stdout).strip()[-300:]}")
    yield f"http://127.0.0.1:{port}"
    subprocess.run(["bash", str(NGINX_SH), "down", str(port)], capture_output=True, timeout=60)


def pattern(base: str, folder: str = "good") -> str:
    return f"{base}/{folder}/shard-{{000000..{NUM_SHARDS - 1:06d}}}.tar"


class DroppingServer(http.server.ThreadingHTTPServer):
    """Serves a directory, but answers the first `drops` requests for BROKEN with half of it and a
    closed connection (the headers announce the whole length, as a server that died mid-shard)."""

    daemon_threads = True

    def __init__(self, directory: Path, drops: int):
        self.directory, self.drops, self.requests = directory, drops, 0
        super().__init__(("127.0.0.1", 0), _DroppingHandler)


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        path = server.directory / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        drop = False
        if path.name == BROKEN:
            server.requests += 1
            drop = server.requests <= server.drops
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if drop else data)
        if drop:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def dropping(shards, tmp_path):
    """start(drops) -> base URL of a server (of good/, the set) that drops BROKEN's connection `drops` times."""
    (tmp_path / "good").symlink_to(shards)
    servers = []

    def start(drops: int) -> tuple[str, DroppingServer]:
        server = DroppingServer(tmp_path, drops)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def epoch_batches(train, *, rank=0, world_size=1, num_workers=0, batch_size=8, seed=3, epoch=0, start_step=0,
                  **options):
    options.setdefault("shuffle_buffer", 20)
    loader = make_loader(train, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                         seed=seed, epoch=epoch, start_step=start_step, retry_delay_s=0.01, **options)
    try:
        batches = [(images.clone(), labels.clone()) for images, labels in loader]
        assert len(batches) == len(loader)
        return batches
    finally:
        loader.close()


def same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        torch.equal(ia, ib) and torch.equal(la, lb) for (ia, la), (ib, lb) in zip(batches_a, batches_b))


# -- reading -------------------------------------------------------------------------------------
def test_http_pipe_curl_and_local_paths_give_the_same_batches(served, shards):
    over_http = epoch_batches(pattern(served), num_workers=2)
    assert len(over_http) == math.ceil(100 / 8)
    assert same(over_http, epoch_batches(f"pipe:curl -s {pattern(served)}"))
    assert same(over_http, epoch_batches(f"{shards}/shard-{{000000..{NUM_SHARDS - 1:06d}}}.tar", num_workers=1))
    # a :: list of single URLs, in another order: the manifest's order is what counts
    urls = [f"{served}/good/shard-{n:06d}.tar" for n in reversed(range(NUM_SHARDS))]
    assert same(over_http, epoch_batches("::".join(urls), manifest_url=f"{served}/good/manifest.json"))
    images, labels = over_http[0]
    assert images.dtype == torch.float32 and images.shape == (8, 3, 16, 16)
    assert -1.0 <= images.min() and images.max() <= 1.0 and labels.dtype == torch.int64


def test_each_sample_is_decoded_and_flipped_as_the_random_access_loader_does(served, shards):
    """Flips hash (seed, epoch, sample number) in both modes: a sample's pixels are the same."""
    manifest = read_manifest(shards)
    source = open_stream_source(pattern(served))
    stream = RankStream(source, batch_size=8, rank=0, world_size=1, seed=3, shuffle_buffer=20)
    records = list(stream.records(epoch=1))
    images = torch.cat([images for images, _ in epoch_batches(pattern(served), epoch=1)])
    starts = np.cumsum([0] + [s.num_samples for s in manifest.shards])
    for (sample, label, _), image in zip(records, images):
        shard = int(np.searchsorted(starts, sample, side="right")) - 1
        offset, size, true_label = load_index(manifest, shard)[sample - starts[shard]].tolist()
        with open(shards / manifest.shards[shard].tar, "rb") as tar:
            tar.seek(offset)
            expected = torch.from_numpy(decode_image(tar.read(size)))
        if _mix(np.array([sample], dtype=np.uint64) ^ _key(3, 1, _FLIP))[0] & np.uint64(1):
            expected = expected.flip(1)
        assert label == true_label
        assert torch.equal(((image * 127.5) + 127.5).round().to(torch.uint8).permute(1, 2, 0), expected)


# -- the split ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_equal_batches_per_rank_and_every_sample_each_epoch(served, world_size):
    source = open_stream_source(pattern(served))
    batch_size, num_samples = 6, 100
    steps = math.ceil(num_samples / (world_size * batch_size))
    seen = []
    for rank in range(world_size):
        stream = RankStream(source, batch_size=batch_size, rank=rank, world_size=world_size, seed=3,
                            shuffle_buffer=20)
        ids = [sample for sample, _, _ in stream.records(epoch=2)]
        assert stream.batches_per_epoch == steps and len(ids) == steps * batch_size
        seen += ids
        by_workers = [epoch_batches(pattern(served), rank=rank, world_size=world_size, num_workers=workers,
                                    batch_size=batch_size, epoch=2) for workers in (0, 1, 2)]
        assert all(len(batches) == steps for batches in by_workers)
        # the order does not depend on the workers (data.num_workers may change on resume)
        assert same(by_workers[0], by_workers[1]) and same(by_workers[0], by_workers[2])
    # every sample at least once; the W*B*b - N positions past the end wrap to the start of the order
    counts = np.bincount(seen, minlength=num_samples)
    assert counts.min() >= 1 and counts.sum() == world_size * steps * batch_size
    assert (counts == 2).sum() == world_size * steps * batch_size - num_samples and counts.max() <= 2


def test_epochs_and_seeds_reorder_shards_and_samples(served):
    source = open_stream_source(pattern(served))

    def order(seed, epoch):
        stream = RankStream(source, batch_size=8, rank=0, world_size=1, seed=seed, shuffle_buffer=20)
        return [sample for sample, _, _ in stream.records(epoch)]

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert sorted(set(order(3, 1))) == list(range(100))


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle_buffer", [20, 7, 1000])
def test_resume_at_any_step_reads_the_same_batches_as_an_uninterrupted_run(served, shuffle_buffer):
    """A run stopped after step s and started again (a new loader, as after a restart) at (epoch, s)."""
    train = pattern(served)
    whole = epoch_batches(train, world_size=2, rank=1, epoch=1, shuffle_buffer=shuffle_buffer)
    for step in (1, 3, 5):
        resumed = epoch_batches(train, world_size=2, rank=1, epoch=1, start_step=step, num_workers=1,
                                shuffle_buffer=shuffle_buffer)
        assert same(resumed, whole[step:])
    # and set_epoch on a live loader, as the trainer's epoch loop does
    loader = make_loader(train, batch_size=8, rank=1, world_size=2, num_workers=2, seed=3,
                         shuffle_buffer=shuffle_buffer)
    try:
        loader.set_epoch(1, 4)
        assert same([(i.clone(), l.clone()) for i, l in loader], whole[4:])
    finally:
        loader.close()


# -- failures -------------------------------------------------------------------------------------
def test_a_shard_that_answers_404_is_retried_then_reported_with_its_url(served):
    with pytest.warns(UserWarning, match="reading it again") as caught:
        with pytest.raises(ShardReadError) as failure:
            epoch_batches(pattern(served, "missing"), retries=2)
    message = str(failure.value)
    assert f"{served}/missing/{BROKEN}" in message and "404" in message and "3 attempts" in message
    assert sum("reading it again" in str(w.message) for w in caught) == 2


def test_pipe_curl_failures_are_reported_with_the_command(served):
    with pytest.warns(UserWarning, match="reading it again"):
        with pytest.raises(ShardReadError) as failure:
            epoch_batches(f"pipe:curl -sf {pattern(served, 'missing')}", retries=1)
    assert f"pipe:curl -sf {served}/missing/{BROKEN}" in str(failure.value)
    assert "exited with status 22" in str(failure.value)


def test_a_truncated_shard_is_an_error_not_fewer_samples(served):
    with pytest.warns(UserWarning, match="reading it again"):
        with pytest.raises(ShardReadError) as failure:
            epoch_batches(pattern(served, "truncated"), retries=1)
    assert f"{served}/truncated/{BROKEN}" in str(failure.value)


@pytest.mark.parametrize("via", ["http", "pipe:curl"])
def test_a_connection_dropped_mid_shard_is_retried_then_reported(dropping, via):
    base, server = dropping(drops=100)
    train = pattern(base) if via == "http" else f"pipe:curl -s {pattern(base)}"
    with pytest.warns(UserWarning, match="reading it again"):
        with pytest.raises(ShardReadError) as failure:
            epoch_batches(train, retries=2)
    assert f"{base}/good/{BROKEN}" in str(failure.value) and server.requests == 3
    if via == "http":
        assert "the connection closed" in str(failure.value)
    else:
        assert "status 18" in str(failure.value)  # curl: transfer closed with bytes remaining


def test_a_dropped_connection_that_recovers_gives_the_same_batches(served, dropping):
    base, server = dropping(drops=1)
    with pytest.warns(UserWarning, match="reading it again"):
        recovered = epoch_batches(pattern(base), world_size=2, rank=0)
    assert server.requests == 2
    assert same(recovered, epoch_batches(pattern(served), world_size=2, rank=0))


def test_listing_errors_say_what_is_wrong(served):
    with pytest.raises(ValueError, match=r"lists 6 of the 7 shards .* missing: shard-000006.tar"):
        make_loader(f"{served}/good/shard-{{000000..000005}}.tar", batch_size=4, rank=0, world_size=1,
                    num_workers=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardReadError, match=rf"{served}/nothing/manifest.json: the manifest .* 404"):
            make_loader(f"{served}/nothing/shard-{{000000..000001}}.tar", batch_size=4, rank=0, world_size=1,
                        num_workers=0, seed=0, retries=1, retry_delay_s=0.01)
    with pytest.raises(ValueError, match="num_classes=7 does not match the 20 classes"):
        make_loader(pattern(served), batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, num_classes=7)
    with pytest.raises(ValueError, match="label_noise"):
        make_loader(pattern(served), batch_size=4, rank=0, world_size=1, num_workers=0, seed=0, label_noise=0.1)


# -- pieces ---------------------------------------------------------------------------------------
def test_the_manifest_is_found_beside_the_first_shard():
    assert manifest_location(["http://h/a/shard-000000.tar"]) == "http://h/a/manifest.json"
    in_a_command = "pipe:aws s3 cp s3://b/x/shard-000003.tar -"
    assert manifest_location([in_a_command]) == "pipe:aws s3 cp s3://b/x/manifest.json -"
    assert manifest_location(["/data/s/shard-000000.tar"], "http://elsewhere/m.json") == "http://elsewhere/m.json"
    with pytest.raises(ValueError, match="set data.manifest"):
        manifest_location(["pipe:get-shard 3"])
    assert is_stream_source("http://h/a/shard-{0..3}.tar") and is_stream_source("pipe:cat x")
    assert is_stream_source("/data/s/shard-000000.tar") and not is_stream_source("/data/shards")


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_reads_what_tarfile_writes(tmp_path, tar_format):
    """Long names (GNU 'L' records, pax path records, ustar prefixes), directories skipped, damage refused."""
    members = [("000000.cls", b"7"), ("000000.jpg", b"x" * 700), (f"{'d' * 90}/{'k' * 60}.jpg", b"y" * 3),
               ("empty.cls", b"")]
    if tar_format != tarfile.USTAR_FORMAT:
        members.append((f"{'n' * 120}.jpg", b"z"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    read = list(_tar_members(io.BytesIO(raw)))
    assert read == members
    damaged = bytearray(raw)
    damaged[raw.index(b"000000.jpg") + 3] ^= 1  # a bit flipped in a header
    with pytest.raises(Exception, match="checksum"):
        list(_tar_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(Exception, match="ends inside"):
        list(_tar_members(io.BytesIO(raw[:1500])))


def test_the_benchmark_measures_every_loader_on_a_tiny_set(served, shards):
    """launch/bench_stream.py's measuring and report, without its long run."""
    sys.path.insert(0, str(ROOT / "launch"))
    import bench_stream

    manifest, rates = bench_stream.benchmark(shards, f"{served}/good", batch_size=16, repeats=1, shuffle_buffer=20)
    assert set(rates) == {(what, workers) for what in ("local, random access", "stream, http (nginx)",
                                                       "stream, local .tar") for workers in (0, 1)}
    assert all(median > 0 and per_cpu > 0 for median, _, _, per_cpu in rates.values())
    text = bench_stream.to_markdown(manifest, rates, batch_size=16, repeats=1, shuffle_buffer=20, seconds=1.0,
                                    command="cmd")
    assert "| stream, http (nginx) | 0 |" in text and "Target (issue 25)" in text and "Machine:" in text


def test_training_streams_over_http_and_resumes_to_the_same_losses(served, tmp_path):
    """launch/train.py with data.train a URL pattern: stopped after 3 steps and resumed (with another
    data.num_workers), it logs the same losses as a run of 6 steps straight."""
    def train(run_dir: Path, steps: int, workers: int) -> list[str]:
        values = {"data.train": pattern(served), "eval.benchmarks": "[]", "run.dir": str(run_dir),
                  "run.max_steps": steps, "run.log_every": 1, "run.checkpoint_every": 3, "data.batch_size": 8,
                  "data.num_workers": workers, "data.shuffle_buffer": 40, "optim.warmup_steps": 1,
                  "optim.schedule": "constant",  # the same learning rate whatever run.max_steps says
                  "logging.wandb_mode": "disabled", "logging.progress": False}
        args = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                               str(ROOT / "configs" / "demo_cpu.yaml"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        return [row.split(",")[2] for row in rows[1:]]  # the loss column

    straight = train(tmp_path / "straight", 6, workers=1)
    train(tmp_path / "resumed", 3, workers=1)
    resumed = train(tmp_path / "resumed", 6, workers=0)
    assert len(straight) == 6 and resumed == straight
