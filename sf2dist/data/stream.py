"""Streaming input: shards read from start to end from URLs, `pipe:` commands or local paths.

`data.train` names the shards the webdataset way (docs/data.md, "Streaming shards"): a brace
pattern such as `http://host/train/shard-{000000..000009}.tar`, several patterns or URLs
joined with `::`, `pipe:COMMAND` (the command writes the tar to stdout, e.g.
`pipe:curl -s http://host/train/shard-000000.tar`), `file:` or plain paths. The manifest
(labels' class count, per-shard sample counts, image size) is read the same way from
`data.manifest`, or when that is empty from the first shard's location with its file name
replaced by `manifest.json`. The listed shards must be exactly the manifest's (matched by
file name), so a mistyped range stops the run instead of training on less.

The order is a function of (seed, epoch, rank, world size, per-rank batch, shuffle buffer)
only; it does not depend on the number of loader workers, so data.num_workers may change on
resume. With N samples in M shards, W ranks and b images per rank and batch:

- Epoch e's shard order is a permutation of the M shards keyed by (seed, e); the epoch is
  the concatenation of the shards in that order, positions 0..N-1 (cyclic: position N is 0).
- Every rank runs B = ceil(N / (W b)) batches per epoch (the random-access loader's count),
  i.e. Q = B b samples; rank r reads positions [r Q, (r+1) Q) sequentially. Every sample is
  read at least once per epoch; the W Q - N positions past N wrap around to the start, so
  the first shards of the order are read twice. A rank's range starts inside a shard in
  general: the samples of that shard before it are read and dropped (at most one shard per
  rank and epoch; no decoding).
- Shuffle buffer: the rank's sequence is cut into blocks of S = data.shuffle_buffer samples
  (the last one shorter), and each block is emitted in a permutation keyed by (seed, e, r,
  block number). A block is mixed as a whole, and the buffer is empty between blocks.
- Batch t is samples [t b, (t+1) b) of that output.

Resume at step s of an epoch is exact and needs nothing but the trainer's (epoch, step): the
position s b lies in block j = s b // S; the rank starts reading at its position j S (the
shard holding it found from the manifest's per-shard counts, the samples before it in that
shard read and dropped), refills block j, permutes it as before and drops its first
s b - j S samples. No buffer contents are saved.

The main process reads (each shard through one sequential stream) and hands each batch's
encoded samples to the loader workers, which decode and flip them as the random-access
loader does (flips hashed from the seed, the epoch and the sample's number in the manifest's
order, so a sample is flipped alike in both modes).

A `pipe:` command runs in a shell, as webdataset's do: commands come only from data.train and
data.manifest (the user's own config); nothing read from a manifest or a shard becomes a
command or a URL (the manifest's shard names are only matched against the given URLs).

Failures: a shard whose stream fails (connection refused or dropped, HTTP error, a command
that exits with an error, a tar that is truncated or damaged, fewer or more samples than the
manifest says) is opened again up to `retries` times, after 1, 2, 4, ... s (x retry_delay_s);
the samples it had already delivered are read again and dropped, so the order is unchanged.
When every attempt failed, `ShardReadError` names the URL and the last error, and the run
stops (it never skips a shard).
"""
from __future__ import annotations

import bisect
import fcntl
import http.client
import io
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from webdataset.shardlists import expand_urls

from sf2dist.data.loader import _FLIP, ShardLoader, _key, _mix
from sf2dist.data.shards import FORMAT, MANIFEST_NAME, Manifest, ShardFormatError, ShardInfo, counted, read_manifest
from sf2dist.imageio import ImageDecodeError, decode_image

# Hash streams of the seed, apart from the random-access loader's (loader.py uses 0..3).
_SHARD_ORDER, _BLOCK_ORDER = 16, 17
_HTTP_TIMEOUT_S = 60  # a connection, or a read, that waits longer fails (and is retried)
_SCHEMES = ("http://", "https://", "pipe:", "file:")
# the last word of a URL or command that ends in .tar: the shard's file name
_TAR_WORD = re.compile(r"""[^\s'"]*\.tar(?=$|[\s'"?#])""")


class ShardReadError(RuntimeError):
    """A shard (or the manifest) could not be read after every retry; the message names its URL."""


def is_stream_source(train: str | os.PathLike) -> bool:
    """Whether `data.train` names shards to stream (URLs, `pipe:`, patterns, tar files), not a directory."""
    text = str(train)
    return text.startswith(_SCHEMES) or "::" in text or "{" in text or text.endswith(".tar")


def shard_urls(train: str) -> list[str]:
    """`data.train` expanded: `::`-separated parts, each brace-expanded (webdataset's rules)."""
    urls = [url.strip() for url in expand_urls(str(train)) if url.strip()]
    if not urls:
        raise ValueError(f"data.train={train!r} names no shards")
    return urls


def _tar_word(url: str) -> str | None:
    """The shard file name part of a URL or `pipe:` command: its last word ending in `.tar`."""
    words = _TAR_WORD.findall(url)
    return words[-1] if words else None


def manifest_location(urls: list[str], manifest: str | None = None) -> str:
    """`manifest` if given, else the first shard's location with its file name replaced by manifest.json."""
    if manifest:
        return manifest
    word = _tar_word(urls[0])
    if word is None:
        raise ValueError(f"cannot tell where the manifest of {urls[0]!r} is (no file name ending in .tar in it); "
                         f"set data.manifest to its location (a URL, pipe: command or path of manifest.json)")
    start = urls[0].rindex(word)
    cut = word.rfind("/") + 1
    return urls[0][:start + cut] + MANIFEST_NAME + urls[0][start + len(word):]


class _Source:
    """One sequential read of a URL, `pipe:` command or file; `stream` is a binary file object."""

    def __init__(self, url: str):
        self.url = url
        self.proc: subprocess.Popen | None = None
        self._response: http.client.HTTPResponse | None = None
        self._stderr = None
        if url.startswith(("http://", "https://")):
            # in this process: a third of the CPU time per image of curl through a pipe (measured);
            # redirects are followed and proxies taken from the environment, as curl would
            request = urllib.request.Request(url, headers={"User-Agent": "sf2dist"})
            self._response = urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S)
            self.stream = io.BufferedReader(self._response, 1 << 20)
            return
        if not url.startswith("pipe:"):
            path = url[len("file://"):] if url.startswith("file://") else url.removeprefix("file:")
            self.stream = open(path, "rb", buffering=1 << 20)
            return
        self._stderr = tempfile.TemporaryFile()
        # its own process group: closing early kills the command and whatever it started
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, bufsize=1 << 20, start_new_session=True)
        self.stream = self.proc.stdout
        try:  # a 1 MiB pipe instead of 64 KiB: 16x fewer wake-ups of reader and writer (Linux)
            fcntl.fcntl(self.stream.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (AttributeError, OSError):
            pass

    def problem(self) -> str:
        """What the command said when it failed ('' when it exited 0 or is still running), or that an HTTP
        response ended before its announced length (a connection closed mid-shard)."""
        if self._response is not None:
            missing = self._response.length
            if missing:
                return (f"the connection closed {missing} bytes before the end of the "
                        f"{self._response.headers.get('Content-Length')}-byte response")
            return ""
        if self.proc is None:
            return ""
        try:
            status = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        if status == 0:
            return ""
        self._stderr.seek(0)
        said = self._stderr.read().decode(errors="replace").strip()[-400:]
        return f"the command exited with status {status}" + (f": {said}" if said else "")

    def close(self) -> None:
        """Stop reading: the command is killed if it still runs."""
        self.stream.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self._stderr.close()


class _Failure(Exception):
    """One failed attempt at reading a URL (retried)."""


def _after_failure(url: str, what: str, err: _Failure, attempt: int, retries: int, retry_delay_s: float) -> None:
    """Warn and wait before the next attempt (retry_delay_s x 1, 2, 4, ...), or ShardReadError after the last."""
    if attempt == retries:
        raise ShardReadError(
            f"{url}: {what} could not be read ({counted(retries + 1, 'attempt')}); last error: {err}. The run "
            f"stops rather than train on fewer samples: check that the server holds this file and answers, then "
            f"run the same command again (training resumes from the last checkpoint)") from None
    delay = retry_delay_s * 2 ** attempt
    warnings.warn(f"{url}: {err}; reading it again in {delay:g} s (attempt {attempt + 2} of {retries + 1})")
    time.sleep(delay)


def read_bytes(url: str, *, retries: int = 3, retry_delay_s: float = 1.0) -> bytes:
    """The whole content of a URL, `pipe:` command or file, with retries."""

    for attempt in range(retries + 1):
        try:
            source = _Source(url)
        except OSError as err:
            _after_failure(url, "the manifest", _Failure(str(err)), attempt, retries, retry_delay_s)
            continue
        try:
            data, problem = source.stream.read(), source.problem()
        except (OSError, http.client.HTTPException) as err:
            data, problem = b"", str(err)
        finally:
            source.close()
        if not problem:
            return data
        _after_failure(url, "the manifest", _Failure(problem), attempt, retries, retry_delay_s)
    raise AssertionError("unreachable: the last failure raises")


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """A manifest.json read from `where` (a URL or command), checked as `shards.read_manifest` checks one."""
    try:
        content = json.loads(raw)
        if not isinstance(content, dict):
            raise ShardFormatError(f"{where} is not a valid sf2dist manifest: not a JSON object")
        if content.get("format") != FORMAT:
            raise ShardFormatError(f"{where}: format is {content.get('format')!r}, expected {FORMAT!r}")
        shards = tuple(ShardInfo(s["tar"], s["index"], int(s["num_samples"])) for s in content["shards"])
        manifest = Manifest(
            directory=Path(where).parent,  # for messages only: the shards are read from data.train's URLs
            num_classes=int(content["num_classes"]),
            num_samples=int(content["num_samples"]),
            image_size=(int(content["image_size"][0]), int(content["image_size"][1])),
            shards=shards,
            source=content["source"],
            counts=content["counts"],
        )
    except ShardFormatError:
        raise
    except KeyError as err:
        raise ShardFormatError(f"{where} is not a valid sf2dist manifest: it lacks the field {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, IndexError, ValueError) as err:
        raise ShardFormatError(f"{where} is not a valid sf2dist manifest: {err}") from None
    if manifest.num_samples < 1 or manifest.num_samples != sum(s.num_samples for s in shards):
        raise ShardFormatError(f"{where}: num_samples is {manifest.num_samples} but the shards hold "
                               f"{sum(s.num_samples for s in shards)} samples")
    return manifest


@dataclass(frozen=True)
class StreamSource:
    """The shards to stream: `urls[n]` reads the manifest's shard n."""

    manifest: Manifest
    urls: tuple[str, ...]
    manifest_url: str


def _match_shards(urls: list[str], manifest: Manifest, manifest_url: str) -> tuple[str, ...]:
    """The URLs in the manifest's shard order; every manifest shard must be listed exactly once."""
    numbers = {shard.tar: n for n, shard in enumerate(manifest.shards)}
    by_shard: dict[int, str] = {}
    unknown = []
    for url in urls:
        word = _tar_word(url) or ""
        parts = word.split("/")
        # the shortest tail of the URL's path that the manifest lists (tar names may hold folders)
        found = next((numbers["/".join(parts[-k:])] for k in range(1, len(parts) + 1)
                      if "/".join(parts[-k:]) in numbers), None)
        if found is None:
            unknown.append(url)
        elif found in by_shard:
            raise ValueError(f"data.train lists shard {manifest.shards[found].tar} twice: {by_shard[found]!r} and "
                             f"{url!r}")
        else:
            by_shard[found] = url
    if unknown:
        raise ValueError(f"data.train lists {len(unknown)} shard(s) that {manifest_url} does not, such as "
                         f"{unknown[0]!r}; point data.manifest at the manifest of these shards")
    missing = [shard.tar for n, shard in enumerate(manifest.shards) if n not in by_shard]
    if missing:
        raise ValueError(
            f"data.train lists {len(by_shard)} of the {len(manifest.shards)} shards of {manifest_url}; missing: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. List them all (a brace range such as "
            f"shard-{{000000..{len(manifest.shards) - 1:06d}}}.tar): training on part of the data is not done silently")
    return tuple(by_shard[n] for n in range(len(manifest.shards)))


def open_stream_source(train: str, manifest: str | None = None, *, retries: int = 3,
                       retry_delay_s: float = 1.0) -> StreamSource:
    """`data.train`'s shard URLs, checked against the manifest read from `manifest` (or beside them)."""
    urls = shard_urls(train)
    where = manifest_location(urls, manifest)
    parsed = parse_manifest(read_bytes(where, retries=retries, retry_delay_s=retry_delay_s), where)
    return StreamSource(parsed, _match_shards(urls, parsed, where), where)


def train_manifest(train: str | os.PathLike, manifest: str | None = None, *, retries: int = 3) -> Manifest:
    """The manifest of `data.train`: read from a shard directory, or fetched for streamed shards
    (`manifest` is data.manifest; the listed shards are checked against it)."""
    if is_stream_source(train):
        return open_stream_source(str(train), manifest, retries=retries).manifest
    return read_manifest(train)


def manifest_path(train: str | os.PathLike, manifest: str | None = None) -> str:
    """Where the manifest of `data.train` is read from, for messages."""
    if is_stream_source(train):
        return manifest_location(shard_urls(str(train)), manifest)
    return str(Path(train) / MANIFEST_NAME)


# -- one rank's samples ----------------------------------------------------------------------------
Record = tuple[int, int, bytes]  # (sample number in the manifest's order, label, encoded image)


def _permutation(n: int, key: np.uint64) -> np.ndarray:
    """A pseudo-random permutation of range(n): the indices sorted by their hash under `key`."""
    return np.argsort(_mix(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


class RankStream:
    """The samples one rank reads in an epoch, in training order (module docstring)."""

    def __init__(self, source: StreamSource, *, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, retries: int = 3, retry_delay_s: float = 1.0):
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries}")
        self.source, self.manifest = source, source.manifest
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.retries, self.retry_delay_s = shuffle_buffer, retries, retry_delay_s
        self.num_samples = self.manifest.num_samples
        self.batches_per_epoch = -(-self.num_samples // (world_size * batch_size))
        self.samples_per_rank = self.batches_per_epoch * batch_size  # Q
        self.shard_starts = list(itertools.accumulate((s.num_samples for s in self.manifest.shards), initial=0))

    def shard_order(self, epoch: int) -> np.ndarray:
        """The manifest's shard numbers in epoch `epoch`'s order."""
        return _permutation(len(self.manifest.shards), _key(self.seed, epoch, _SHARD_ORDER))

    def records(self, epoch: int, start: int = 0) -> Iterator[Record]:
        """This rank's samples of `epoch` in training order, from position `start` of that order (s b to
        resume at step s): its Q samples when start is 0."""
        block_size = self.shuffle_buffer
        first_block = start // block_size
        reading = self._read(epoch, first_block * block_size)
        try:
            for block in itertools.count(first_block):
                size = min(block_size, self.samples_per_rank - block * block_size)
                if size <= 0:
                    return
                samples = list(itertools.islice(reading, size))
                assert len(samples) == size, "the rank's positions are cyclic: reading never runs out"
                order = _permutation(size, _key(self.seed, epoch, _BLOCK_ORDER, self.rank, block))
                skip = start - block * block_size if block == first_block else 0
                for i in order[skip:].tolist():
                    yield samples[i]
        finally:
            reading.close()

    def _read(self, epoch: int, first: int) -> Iterator[Record]:
        """The rank's positions first, first+1, ... (up to its Q) of the epoch's shard sequence, read in order."""
        order = self.shard_order(epoch)
        counts = np.array([s.num_samples for s in self.manifest.shards], dtype=np.int64)[order]
        ends = np.cumsum(counts)
        position = (self.rank * self.samples_per_rank + first) % self.num_samples
        left = self.samples_per_rank - first
        slot = int(np.searchsorted(ends, position, side="right"))
        offset = position - (int(ends[slot - 1]) if slot else 0)
        while left > 0:
            shard = int(order[slot])
            take = min(left, int(counts[slot]) - offset)
            yield from self.read_shard(shard, offset, offset + take)
            left -= take
            slot, offset = (slot + 1) % len(order), 0

    def read_shard(self, shard: int, start: int, stop: int) -> Iterator[Record]:
        """Samples [start, stop) of a shard, read from its beginning; retried as the module docstring says."""
        url, expected = self.source.urls[shard], self.manifest.shards[shard].num_samples
        done = start  # the next sample to deliver: a retry reads again up to it
        for attempt in range(self.retries + 1):
            records = self._attempt(url, shard, done, stop, expected)
            try:
                for record in records:
                    yield record
                    done += 1
                return
            except _Failure as err:
                _after_failure(url, f"shard {self.manifest.shards[shard].tar}", err, attempt, self.retries,
                               self.retry_delay_s)
            finally:
                records.close()  # also when this generator is closed early: the command is killed

    def _attempt(self, url: str, shard: int, start: int, stop: int, expected: int) -> Iterator[Record]:
        """One read of a shard from its beginning: samples [start, stop), or _Failure."""
        try:
            source = _Source(url)
        except OSError as err:
            raise _Failure(str(err)) from None
        first_id, num_classes = self.shard_starts[shard], self.manifest.num_classes
        count = 0
        try:
            try:
                for key, sample in _samples(source.stream):
                    if count >= expected:
                        raise _Failure(f"the shard holds more than the {expected} samples the manifest lists")
                    if count >= start:
                        label, image = _label_and_image(sample, key, num_classes)
                        yield first_id + count, label, image
                    count += 1
                    if count == stop and stop < expected:
                        return  # the rest of the shard is another rank's (or the next epoch's)
            except (OSError, ValueError, http.client.HTTPException, _Failure) as err:
                raise _Failure(_describe(source, f"after {count} samples: {err}")) from None
            if count < expected:
                raise _Failure(_describe(source, f"the shard ends after {count} of the {expected} samples the "
                                                 f"manifest lists"))
        finally:
            source.close()


def _describe(source: _Source, problem: str) -> str:
    """The source's own failure first (a command's exit status and message, a response cut short), then what
    the reader saw."""
    said = source.problem()
    return f"{said} ({problem})" if said else problem


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise _Failure(f"the stream ends inside a tar member ({len(data)} of {size} bytes)")
    return data


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, in order.

    A small reader of what tar writers produce (ustar, GNU long names, pax path records), used
    instead of `tarfile` in stream mode (webdataset's `tar_file_iterator`), which costs about as
    much CPU per face as decoding it; header checksums and short reads are errors.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) == 0 or header == bytes(512):
            return  # the end-of-archive blocks (or the end of a tar written without them)
        if len(header) != 512:
            raise _Failure(f"the stream ends inside a tar header ({len(header)} of 512 bytes)")
        try:
            size = int(header[124:136].strip(b" \0") or b"0", 8)
            checksum = int(header[148:156].strip(b" \0"), 8)
        except ValueError:
            raise _Failure(f"invalid tar header (size field {header[124:136]!r})") from None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise _Failure("invalid tar header (bad checksum): the shard is damaged or not a tar")
        data = _read_exactly(stream, size)
        padding = -size % 512
        if padding:
            _read_exactly(stream, padding)
        kind = header[156:157]
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind == b"x":  # pax extended header: the next member's path, if given
            for record in data.decode("utf-8", "replace").splitlines():
                _, _, field = record.partition(" ")
                if field.startswith("path="):
                    long_name = field[len("path="):]
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: not samples
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        long_name = None
        yield name, data


def _samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar stream: consecutive members sharing a key."""
    key, sample = None, {}
    for name, data in _tar_members(stream):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            raise _Failure(f"tar member {name!r} has no extension (expected KEY.cls and KEY.jpg)")
        if name[:dot] != key:
            if key is not None:
                yield key, sample
            key, sample = name[:dot], {}
        sample[name[dot + 1:]] = data
    if key is not None:
        yield key, sample


def _label_and_image(sample: dict[str, bytes], key: str, num_classes: int) -> tuple[int, bytes]:
    if "cls" not in sample or "jpg" not in sample:
        raise _Failure(f"sample {key!r} has members {sorted(sample)}; expected cls and jpg")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise _Failure(f"sample {key!r}: cls is {sample['cls'][:20]!r}, not a decimal class number") from None
    if not 0 <= label < num_classes:
        raise _Failure(f"sample {key!r}: label {label} is outside the manifest's {num_classes} classes")
    return label, sample["jpg"]


# -- the loader ------------------------------------------------------------------------------------
class StreamBatches(Dataset):
    """`self[(epoch, step, records)]` -> (images uint8 [b, H, W, 3], labels int64 [b]): decode and flip.

    The records come from the main process (`_StreamSampler`); the workers only decode.
    """

    def __init__(self, stream: RankStream, *, seed: int, flip: bool):
        self.manifest, self.urls, self.shard_starts = stream.manifest, stream.source.urls, stream.shard_starts
        self.batches_per_epoch = stream.batches_per_epoch
        self.seed, self.flip = seed, flip

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, key: tuple[int, int, list[Record]]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, _, records = key
        height, width = self.manifest.image_size
        ids = np.array([r[0] for r in records], dtype=np.int64)
        labels = np.array([r[1] for r in records], dtype=np.int64)
        pixels = np.empty((len(records), height, width, 3), dtype=np.uint8)
        images = torch.from_numpy(pixels)  # the same memory
        for i in range(len(records)):
            used = self._decode(records, i, pixels[i])
            ids[i], labels[i] = records[used][0], records[used][1]
        if self.flip:  # as the random-access loader: a hash of (seed, epoch, sample number)
            flips = (_mix(ids.astype(np.uint64) ^ _key(self.seed, epoch, _FLIP)) & np.uint64(1)).astype(bool)
            for i in np.flatnonzero(flips).tolist():
                images[i] = images[i].flip(1)  # torch's flip: numpy's reversed-stride copy costs more
        return images, torch.from_numpy(labels)

    def _decode(self, records: list[Record], i: int, out: np.ndarray) -> int:
        """Decode record i into `out`, or the next decodable record of the batch; returns the one used."""
        expected = (*self.manifest.image_size, 3)
        for attempt in range(len(records)):
            used = (i + attempt) % len(records)
            try:
                image = decode_image(records[used][2], out)
                if image.shape != expected:
                    raise ImageDecodeError(f"image shape {image.shape}, manifest says {expected}")
                if image is not out:
                    out[...] = image
                return used
            except ImageDecodeError as err:
                sample = records[used][0]
                shard = bisect.bisect_right(self.shard_starts, sample) - 1
                warnings.warn(f"{self.urls[shard]}: sample {sample - self.shard_starts[shard]} of the shard is "
                              f"unreadable ({err}); using another sample of the batch instead (re-convert the "
                              f"dataset to repair it)")
        raise RuntimeError(f"no sample of a batch of {len(records)} decodes (the first from "
                           f"{self.urls[bisect.bisect_right(self.shard_starts, records[0][0]) - 1]}); the shards are "
                           f"damaged, re-convert them")


class _StreamSampler(Sampler):
    """Yields (epoch, step, records of that batch) for the steps still to run in the current epoch."""

    def __init__(self, stream: RankStream):
        self.stream = stream
        self.batches_per_epoch = stream.batches_per_epoch
        self.epoch = 0
        self.start_step = 0

    def __iter__(self):
        batch_size = self.stream.batch_size
        records = self.stream.records(self.epoch, self.start_step * batch_size)
        try:
            for step in range(self.start_step, self.batches_per_epoch):
                yield self.epoch, step, list(itertools.islice(records, batch_size))
        finally:
            records.close()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_step


def make_stream_loader(
    train: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    num_classes: int | None = None,
    flip: bool = True,
    label_noise: float = 0.0,
    start_step: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    device: torch.device | str | None = None,
    shuffle_buffer: int = 10000,
    manifest_url: str | None = None,
    retries: int = 3,
    retry_delay_s: float = 1.0,
) -> ShardLoader:
    """The streaming loader of rank `rank` out of `world_size` (make_loader's arguments; module docstring)."""
    if label_noise > 0:
        raise ValueError(f"data.label_noise={label_noise} needs every sample's label before the first step, which "
                         f"streamed shards do not give: use a local shard directory for label-noise runs")
    source = open_stream_source(train, manifest_url, retries=retries, retry_delay_s=retry_delay_s)
    if num_classes is not None and num_classes != source.manifest.num_classes:
        raise ValueError(
            f"num_classes={num_classes} does not match the {source.manifest.num_classes} classes of "
            f"{source.manifest_url}: set data.num_classes={source.manifest.num_classes} or remove it (the head is "
            f"sized from the manifest, loader.num_classes), or point at the right shards")
    stream = RankStream(source, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                        shuffle_buffer=shuffle_buffer, retries=retries, retry_delay_s=retry_delay_s)
    return ShardLoader(
        StreamBatches(stream, seed=seed, flip=flip), epoch=epoch, start_step=start_step, num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor, device=device, sampler=_StreamSampler(stream),
    )
