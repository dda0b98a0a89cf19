"""The training loader: which samples each rank sees at each step, read, decoded and augmented.

Work is split by samples, not by shards. An epoch's order is a pseudo-random permutation
of all N samples keyed by (seed, epoch) (`EpochOrder`), so every rank and worker computes
the same order without communicating, a resumed run recomputes it exactly, and the order
needs no memory (a Feistel network with cycle walking instead of an N-element array, which
matters at WebFace260M scale with many workers per node). Global step t takes positions
[t·W·b, (t+1)·W·b) of that order; rank r takes the slice [r·b, (r+1)·b) of it.

Remainder policy: every rank runs ceil(N / (W·b)) steps per epoch; the positions past N
wrap around to the start of the epoch's order. Every sample is seen at least once per epoch
and the first (steps·W·b − N) samples of the order are seen twice; no rank ever runs out
first, whatever the number of shards, ranks and workers.

Batch t of an epoch is computed from (seed, epoch, t) alone: DataLoader workers receive
(epoch, step) keys from a sampler in the main process, so the order is the same for any
num_workers, and resuming at a step is skipping to it. Samples are read at random through
the per-shard index (shards.py) with one pread each; this suits local disks and the page
cache (stage shards to local storage on network file systems). Flips are derived from
per-sample hashes of the seed and the epoch, so they too are reproducible.

Label noise (`noisy_labels`) is a fixed corruption of the dataset, as in the SphereFace2
paper's noisy-label experiment: within every class, exactly round(p · n_c) of its n_c samples
(rounded half up) get a uniformly drawn *other* class. Which samples and which classes
depend on the seed and the samples' global numbers only, so a sample carries the same
noisy label in every epoch, on every rank and for any world size or batch size. The table
is built once per loader from the shard indexes (vectorised; int64, 8 bytes per sample).

A record that fails to decode here (a shard damaged after conversion) is reported with a
warning naming the shard and byte offset and replaced by the next sample of the dataset,
so that batch sizes and counts stay equal on every rank.
"""
from __future__ import annotations

import atexit
import bisect
import functools
import itertools
import math
import multiprocessing
import multiprocessing.util  # its exit handler registered before ours, so ours runs first
import os
import signal
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sf2dist.data.shards import Manifest, load_index, read_manifest
from sf2dist.imageio import ImageDecodeError, decode_image, normalize_batch

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6
_MAX_SUBSTITUTES = 16
_MAX_OPEN_SHARDS = 64
# Independent hash streams derived from the seed.
_ORDER, _FLIP, _NOISE_PICK, _NOISE_CLASS = range(4)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each uint64 element."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """A 64-bit key derived from integers (seed, epoch, stream, ...)."""
    state = np.zeros(1, dtype=np.uint64)
    for part in parts:
        state = _mix(state + np.uint64((part + 0x9E3779B97F4A7C15) & _MASK64))
    return state[0]


def noisy_labels(labels: np.ndarray, ratio: float, seed: int, num_classes: int) -> np.ndarray:
    """`labels` [N] (int64, sample i's true class) with per-class label noise applied.

    Within each class c with n_c samples, the floor(ratio · n_c + 1/2) samples with the
    lowest hash of (seed, sample number) are changed, each to class (c + k) mod num_classes
    with k hashed from (seed, sample number) in [1, num_classes − 1]: a uniformly drawn
    other class. Nothing depends on how samples are later split or ordered.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"label noise ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0 or len(labels) == 0:
        return labels.copy()
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    sample_ids = np.arange(len(labels), dtype=np.uint64)
    picks = _mix(sample_ids ^ _key(seed, _NOISE_PICK))
    # samples grouped by class, each class's in hash order; a sample's rank within its class
    order = np.lexsort((picks, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, len(labels)])
    rank_in_class = np.arange(len(labels)) - np.repeat(starts, sizes)
    changed_per_class = np.floor(ratio * sizes + 0.5).astype(np.int64)
    changed = np.zeros(len(labels), dtype=bool)
    changed[order] = rank_in_class < np.repeat(changed_per_class, sizes)
    shifts = 1 + (_mix(sample_ids ^ _key(seed, _NOISE_CLASS)) % np.uint64(num_classes - 1)).astype(np.int64)
    return np.where(changed, (labels + shifts) % num_classes, labels)


class EpochOrder:
    """A pseudo-random bijection of [0, n) keyed by (seed, epoch), evaluated on demand."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"cannot order {n} samples")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2  # domain 4^half < 4n: cycle walking takes < 4 rounds on average
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = [_key(seed, epoch, _ORDER, r) for r in range(_FEISTEL_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at these positions of the epoch's order (int64 in, int64 out)."""
        ids = self._feistel(np.asarray(positions, dtype=np.int64).astype(np.uint64))
        outside = ids >= self.n
        while outside.any():
            ids[outside] = self._feistel(ids[outside])
            outside = ids >= self.n
        return ids.astype(np.int64)


class EpochBatches(Dataset):
    """One rank's batches: `self[(epoch, step)]` -> (images uint8 [b, H, W, 3], labels int64 [b]).

    The images are decoded and flipped but not normalised: workers hand uint8 to the main
    process (a quarter of the shared-memory and host-to-device traffic of float32), and
    `ShardLoader` normalises whole batches where they are used (`sf2dist.imageio.normalize_batch`).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        flip: bool,
        label_noise: float,
    ):
        self.manifest = manifest
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.flip, self.label_noise = seed, flip, label_noise
        self.num_samples = manifest.num_samples
        self.batches_per_epoch = math.ceil(self.num_samples / (world_size * batch_size))
        # a list and bisect: per-sample lookups are on the hot path, numpy calls cost more there
        self._shard_starts = list(itertools.accumulate((s.num_samples for s in manifest.shards), initial=0))
        self._indexes: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._noisy_labels: np.ndarray | None = None  # [N] int64, every sample's training label
        if label_noise > 0:
            true_labels = np.concatenate([load_index(manifest, n)[:, 2] for n in range(len(manifest.shards))])
            self._noisy_labels = noisy_labels(true_labels, label_noise, seed, manifest.num_classes)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def sample_ids(self, epoch: int, step: int) -> np.ndarray:
        """Ids (global sample numbers, in shard order) of this rank's batch at `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64) % self.num_samples
        return EpochOrder(self.num_samples, self.seed, epoch)(positions)

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """Training labels of these samples (int64), label noise included (module doc)."""
        if self._noisy_labels is not None:
            return self._noisy_labels[ids]
        return np.array([self._locate(i)[3] for i in ids.tolist()], dtype=np.int64)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, step = key
        height, width = self.manifest.image_size
        ids = self.sample_ids(epoch, step)
        if self.flip:
            flips = (_mix(ids.astype(np.uint64) ^ _key(self.seed, epoch, _FLIP)) & np.uint64(1)).astype(bool)
        else:
            flips = np.zeros(len(ids), dtype=bool)
        # numpy's allocator reuses (or maps huge pages for) big buffers where torch's maps
        # fresh pages for every batch; on VMs those page faults cost nearly as much as decoding
        pixels = np.empty((len(ids), height, width, 3), dtype=np.uint8)
        images = torch.from_numpy(pixels)  # the same memory
        for i, sample_id in enumerate(ids.tolist()):
            if flips[i]:
                image, ids[i] = self._decode(sample_id)
                # torch's flip: numpy's reversed-stride copy of 3-byte pixels costs 6x as much
                images[i] = torch.from_numpy(image).flip(1)
            else:
                _, ids[i] = self._decode(sample_id, out=pixels[i])  # decoded in place
        return images, torch.from_numpy(self.labels_of(ids))

    def _locate(self, sample_id: int) -> tuple[int, int, int, int]:
        """(shard number, byte offset, size, label) of a sample."""
        shard = bisect.bisect_right(self._shard_starts, sample_id) - 1
        if shard not in self._indexes:
            self._indexes[shard] = load_index(self.manifest, shard).view(np.ndarray)  # no memmap subclass overhead
        offset, size, label = self._indexes[shard][sample_id - self._shard_starts[shard]].tolist()
        return shard, offset, size, label

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if shard not in self._fds:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            path = self.manifest.directory / self.manifest.shards[shard].tar
            self._fds[shard] = os.open(path, os.O_RDONLY)
        return os.pread(self._fds[shard], size, offset)

    def _decode(self, sample_id: int, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """The decoded image of a sample, or of the next decodable one: (image, its id).

        With `out` the image is decoded into it (and `out` returned).
        """
        expected = (*self.manifest.image_size, 3)
        for attempt in range(_MAX_SUBSTITUTES):
            candidate = (sample_id + attempt) % self.num_samples
            shard, offset, size, _ = self._locate(candidate)
            data = self._read(shard, offset, size)
            try:
                if len(data) != size:
                    raise ImageDecodeError(f"shard ends after {len(data)} of {size} bytes")
                image = decode_image(data, out)
                if image.shape != expected:
                    raise ImageDecodeError(f"image shape {image.shape}, manifest says {expected}")
                return image, candidate
            except ImageDecodeError as err:
                tar = self.manifest.directory / self.manifest.shards[shard].tar
                warnings.warn(
                    f"{tar}: sample at byte offset {offset} is unreadable ({err}); "
                    f"using the next sample instead (re-convert the dataset to repair it)"
                )
        raise RuntimeError(
            f"{_MAX_SUBSTITUTES} consecutive samples from sample {sample_id} of "
            f"{self.manifest.directory} are unreadable; the shards are damaged, re-convert them"
        )

    def __getstate__(self) -> dict:
        # Worker processes open their own files and memory maps.
        return {**self.__dict__, "_indexes": {}, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class _StepSampler(Sampler):
    """Yields (epoch, step) keys of the steps still to run in the current epoch."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.start_step = 0

    def __iter__(self):
        return ((self.epoch, step) for step in range(self.start_step, self.batches_per_epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_step


def _worker_started(shared, worker_id: int) -> None:
    """SLURM signals every process of a job step; a worker that died of SIGTERM/SIGUSR1 would
    take the rank down before it could checkpoint, so workers ignore both (the trainer handles
    them) until the main process says it is closing the loader. Python's multiprocessing ends
    daemonic workers at exit with SIGTERM and then waits for them: `ShardLoader.close` (run
    at exit, before that) raises the flag first, so the workers exit cleanly then."""
    pids, closing = shared
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if closing.value else None)
    pids[worker_id] = os.getpid()


def _close_workers(shared) -> None:
    pids, closing = shared
    closing.value = 1
    children = {child.pid: child for child in multiprocessing.active_children()}
    ours = [children[pid] for pid in pids if pid in children]  # live workers of this process only
    for child in ours:
        child.terminate()
    for child in ours:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


class ShardLoader:
    """Iterable over one rank's (images, labels) batches of the current epoch.

    Images are float32 [b, 3, H, W] in [-1, 1] and labels int64 [b], both on `device`
    (CPU when None). The workers decode and flip into uint8 batches; the normalisation runs
    on `device` after the transfer (`uint8_batches` yields what the workers produce).
    `len(loader)` is the number of batches the next iteration yields (from `start_step` to
    the end of the epoch), equal on every rank; `batches_per_epoch` is the full count.
    """

    def __init__(self, batches: EpochBatches, *, epoch: int, start_step: int, num_workers: int,
                 pin_memory: bool, prefetch_factor: int, device: torch.device | str | None = None,
                 sampler: Sampler | None = None):
        self.batches = batches
        self.device = torch.device(device or "cpu")
        # the keys of the steps to run: (epoch, step), or what another dataset takes (stream.py); it has
        # epoch, start_step and batches_per_epoch attributes
        self._sampler = sampler if sampler is not None else _StepSampler(batches.batches_per_epoch)
        self.set_epoch(epoch, start_step)
        # the workers' pids and the "closing" flag, shared with them (see _worker_started)
        workers = (multiprocessing.RawArray("q", max(num_workers, 1)), multiprocessing.RawValue("b", 0))
        self._finalizer = weakref.finalize(self, _close_workers, workers)
        atexit.register(self._finalizer)  # before multiprocessing's own exit handler: the last registered runs first
        self._loader = DataLoader(
            batches,
            batch_size=None,  # the dataset returns whole batches
            sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=functools.partial(_worker_started, workers),
            # Its own generator for the workers' base seed (unused: the randomness here is hashed
            # from seed and epoch): starting an iterator never draws from the global RNG, so the
            # RNG state a resumed run restores stays in step with an uninterrupted run.
            generator=torch.Generator(),
        )

    @property
    def manifest(self) -> Manifest:
        return self.batches.manifest

    @property
    def num_classes(self) -> int:
        return self.batches.manifest.num_classes

    @property
    def batches_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    @property
    def start_step(self) -> int:
        return self._sampler.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate `epoch` next, from `start_step` (to resume mid-epoch)."""
        if not 0 <= start_step <= self.batches_per_epoch:
            raise ValueError(
                f"start_step={start_step} is outside the {self.batches_per_epoch} steps of an epoch"
            )
        self._sampler.epoch, self._sampler.start_step = epoch, start_step

    def __len__(self) -> int:
        return len(self._sampler)

    def close(self) -> None:
        """End the worker processes now (they ignore SIGTERM); the loader cannot be iterated after."""
        self._finalizer()

    def uint8_batches(self):
        """The current epoch's (images uint8 [b, H, W, 3], labels) as the workers produce them."""
        return iter(self._loader)

    def __iter__(self):
        for images, labels in self._loader:
            images = images.to(self.device, non_blocking=True)
            yield normalize_batch(images), labels.to(self.device, non_blocking=True)


def make_loader(
    shard_dir: str | os.PathLike,
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
    """The loader of rank `rank` out of `world_size` for the shards in `shard_dir`.

    `batch_size` is per rank; batches arrive normalised on `device` (CPU when None).
    `num_classes`, when given, must equal the manifest's (the head is sized from it).
    `label_noise` is the fraction of each class's samples whose label is replaced by a
    uniformly drawn other class (`noisy_labels`: per class, fixed by the seed).

    A `shard_dir` that names shards to stream (URLs, `pipe:` commands, brace patterns, `::`
    lists, .tar paths) gets the streaming loader of sf2dist/data/stream.py instead, which
    also takes `shuffle_buffer`, `manifest_url` (where manifest.json is; None: beside
    the shards), `retries` and `retry_delay_s`; a directory ignores them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be non-negative, got {num_workers}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    from sf2dist.data import stream  # it imports this module

    if stream.is_stream_source(shard_dir):
        return stream.make_stream_loader(
            str(shard_dir), batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
            seed=seed, epoch=epoch, num_classes=num_classes, flip=flip, label_noise=label_noise,
            start_step=start_step, pin_memory=pin_memory, prefetch_factor=prefetch_factor, device=device,
            shuffle_buffer=shuffle_buffer, manifest_url=manifest_url, retries=retries, retry_delay_s=retry_delay_s,
        )
    manifest = read_manifest(shard_dir)
    if num_classes is not None and num_classes != manifest.num_classes:
        raise ValueError(
            f"num_classes={num_classes} does not match the {manifest.num_classes} classes of "
            f"{Path(shard_dir) / 'manifest.json'}: set data.num_classes={manifest.num_classes} or remove it "
            f"(the head is sized from the manifest, loader.num_classes), or point at the right shards"
        )
    if label_noise > 0 and manifest.num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes; {shard_dir} has {manifest.num_classes}")
    batches = EpochBatches(
        manifest, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
        flip=flip, label_noise=label_noise,
    )
    return ShardLoader(
        batches, epoch=epoch, start_step=start_step, num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor, device=device,
    )
