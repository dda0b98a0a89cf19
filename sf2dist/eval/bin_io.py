"""Verification pair sets from disk: InsightFace `.bin` files and `label path0 path1` pair lists.

A `.bin` file is a pickle of `(list of encoded images, list of bools)`; pair i is images 2i
and 2i+1 (docs/design.md, "File formats"). Loading a pickle can run any function it names, so these
files go through `SafeUnpickler`, which admits only the globals such files are made of:

- `_codecs.encode(text, "latin1")`: how Python 3 writes `bytes` at pickle protocol 2;
- numpy's array, scalar and dtype reconstruction, for label lists stored as numpy bools
  (only the bool dtype is accepted).

Any other global is refused before it is looked up, with an `UnsafePickleError` naming it and
the file. The synthetic held-out sets of `sf2dist.data` use the same layout (protocol 4).

`read_bin`, `read_pair_list` and `read_pairs` read and check a pair set without decoding its
images (`EncodedPairs`), so that a rank decodes only the images it embeds
(`EncodedPairs.decode(start, stop)`); the `load_*` functions decode every image.
"""
from __future__ import annotations

import _codecs
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from sf2dist.imageio import ImageDecodeError, decode_image

PICKLE_MAGIC = b"\x80"  # first byte of every pickle of protocol 2 or higher


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the layout it should; the message says where."""


class UnsafePickleError(BenchmarkFormatError):
    """A pickle asked for a global outside the allow-list; nothing of it was executed."""


class PairSet(NamedTuple):
    """Decoded verification pairs: pair i is `images[2 * i]` and `images[2 * i + 1]`."""

    images: np.ndarray  # uint8 [2n, H, W, 3], RGB
    issame: np.ndarray  # bool [n]


def _latin1_encode(text: str, encoding: str = "utf-8", *rest: Any) -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if encoding.replace("-", "").replace("_", "").lower() != "latin1" or rest:
        raise UnsafePickleError(f"_codecs.encode is admitted only with the latin1 codec, not {encoding!r}")
    return _codecs.encode(text, "latin1")


def _bool_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align, copy)
    if dtype != np.bool_:
        raise UnsafePickleError(f"numpy dtype {dtype} is not admitted; only bool labels are")
    return dtype


def _numpy_reconstructors() -> dict[str, Any]:
    # Taken from numpy's own reductions rather than its private module paths, which moved
    # from numpy.core to numpy._core in numpy 2.
    array = np.zeros(1, dtype=np.bool_)
    return {
        "_reconstruct": array.__reduce_ex__(2)[0],
        "_frombuffer": array.__reduce_ex__(5)[0],
        "scalar": np.bool_(True).__reduce__()[0],
    }


def _allowed_globals() -> dict[tuple[str, str], Any]:
    numpy_functions = _numpy_reconstructors()
    allowed = {
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): _bool_dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = numpy_functions["_reconstruct"]
        allowed[(f"{package}.multiarray", "scalar")] = numpy_functions["scalar"]
        allowed[(f"{package}.numeric", "_frombuffer")] = numpy_functions["_frombuffer"]
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `_allowed_globals()`.

    `encoding="bytes"` reads Python 2 `str` objects (the images of InsightFace's files) as
    `bytes`.
    """

    _ALLOWED = _allowed_globals()

    def __init__(self, file) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the pickle asks for {module}.{name}, which a verification set never contains"
            ) from None


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f).load()
        except UnsafePickleError as err:
            raise UnsafePickleError(f"{path}: refusing to load it: {err} (nothing from the file was executed)") from None
        except Exception as err:  # a malformed pickle can fail in many ways; all mean "not a .bin"
            raise BenchmarkFormatError(
                f"{path}: not a readable pickle of (images, issame): {type(err).__name__}: {err}"
            ) from err


def _validated_pairs(obj: Any, path: Path) -> tuple[list[bytes], np.ndarray]:
    """Check the unpickled object is (list of bytes, bools) with two images per label."""
    if not isinstance(obj, tuple) or len(obj) != 2:
        found = f"a {len(obj)}-tuple" if isinstance(obj, tuple) else f"a {type(obj).__name__}"
        raise BenchmarkFormatError(f"{path}: expected a pickle of (images, issame), found {found}")
    images, issame = obj
    if not isinstance(images, list):
        raise BenchmarkFormatError(f"{path}: images must be a list of encoded images, found a {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, bytes):
            raise BenchmarkFormatError(f"{path}: image {index} is a {type(image).__name__}, expected encoded bytes")
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise BenchmarkFormatError(f"{path}: issame array must be 1-D bool, found {issame.dtype} {issame.shape}")
        labels = issame.copy()
    elif isinstance(issame, list):
        for index, label in enumerate(issame):
            if not isinstance(label, (bool, np.bool_)):
                raise BenchmarkFormatError(f"{path}: issame[{index}] is a {type(label).__name__}, expected a bool")
        labels = np.array(issame, dtype=np.bool_)
    else:
        raise BenchmarkFormatError(f"{path}: issame must be a list of bools, found a {type(issame).__name__}")
    if len(images) == 0 or len(images) % 2:
        raise BenchmarkFormatError(f"{path}: needs an even, non-zero number of images (two per pair), found {len(images)}")
    if len(labels) != len(images) // 2:
        raise BenchmarkFormatError(
            f"{path}: {len(images)} images make {len(images) // 2} pairs but issame has {len(labels)} labels"
        )
    return images, labels


def stack_images(
    images: Iterable[np.ndarray], where: Sequence[str], image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Stack decoded RGB images (`len(where)` of them) into one uint8 [N, H, W, 3] array.

    All must share one size: `image_size` (H, W) when given, else the first image's.
    `where[i]` names image i in the `BenchmarkFormatError` that reports one of another size.
    """
    stacked: np.ndarray | None = None
    for index, image in enumerate(images):
        if stacked is None:
            shape = (*image_size, 3) if image_size is not None else image.shape
            stacked = np.empty((len(where), *shape), dtype=np.uint8)
        if image.shape != stacked.shape[1:]:
            reference = "the model takes" if image_size is not None else "the first one is"
            raise BenchmarkFormatError(
                f"{where[index]}: image is {image.shape[1]}x{image.shape[0]} but {reference} "
                f"{stacked.shape[2]}x{stacked.shape[1]}; every image of a benchmark must have the model's input size"
            )
        stacked[index] = image
    assert stacked is not None and index == len(where) - 1
    return stacked


def _decoded(data: bytes, where: str) -> np.ndarray:
    try:
        return decode_image(data)
    except ImageDecodeError as err:
        raise BenchmarkFormatError(f"{where}: {err}") from err


@dataclass(frozen=True, eq=False)
class EncodedPairs:
    """A pair set read and checked, its images not decoded yet.

    Pair i shows images 2i and 2i+1; image k is the distinct image `image_index[k]`, held as
    encoded bytes (a `.bin`) or named by its file (a pair list, read when decoded).
    """

    path: Path
    sources: list[bytes] | list[Path] = field(repr=False)  # [D] distinct images
    image_index: np.ndarray = field(repr=False)  # int64 [2n], into sources
    issame: np.ndarray = field(repr=False)  # bool [n]

    @property
    def num_images(self) -> int:
        return len(self.image_index)

    def _where(self, source: int) -> str:
        found = self.sources[source]
        return str(found) if isinstance(found, Path) else f"{self.path}: image {source}"

    def _encoded(self, source: int) -> bytes:
        found = self.sources[source]
        if not isinstance(found, Path):
            return found
        try:
            return found.read_bytes()
        except OSError as err:
            raise BenchmarkFormatError(f"{self.path}: cannot read image {found}: {err.strerror}") from err

    def decode(self, start: int = 0, stop: int | None = None, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Images [start, stop) as uint8 [stop - start, H, W, 3] (see `stack_images` for `image_size`).

        Only the distinct images in that range are read and decoded, each once.
        """
        stop = self.num_images if stop is None else stop
        if not 0 <= start < stop <= self.num_images:
            raise ValueError(f"images [{start}, {stop}) are not a non-empty range of the {self.num_images} of {self.path}")
        wanted = self.image_index[start:stop]
        distinct, slot = np.unique(wanted, return_inverse=True)  # slot: wanted[k] == distinct[slot[k]]
        decoded = stack_images(
            (_decoded(self._encoded(source), self._where(source)) for source in distinct),
            [self._where(source) for source in distinct],
            image_size,
        )
        # A .bin's images are all distinct and in order: no copy of the decoded array then.
        return decoded if np.array_equal(distinct, wanted) else decoded[slot]

    def load(self) -> PairSet:
        """Every image decoded, with the labels."""
        return PairSet(self.decode(), self.issame)


def read_bin(path: str | os.PathLike) -> EncodedPairs:
    """Read and check an InsightFace `.bin` verification file (or a synthetic held-out set) safely.

    Raises `UnsafePickleError` if the pickle names any global outside the allow-list and
    `BenchmarkFormatError` if its content is not (list of 2n encoded images, n bools).
    """
    path = Path(path)
    images, labels = _validated_pairs(_load_pickle(path), path)
    return EncodedPairs(path, images, np.arange(len(images), dtype=np.int64), labels)


def read_pair_list(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> EncodedPairs:
    """Read and check a pair list: one `label path0 path1` per line, label 1 (same) or 0 (different).

    Relative image paths are taken from `image_root`, by default the list's own folder.
    Blank lines and lines starting with `#` are skipped. Every image must be a file; none is
    read until it is decoded.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    labels: list[bool] = []
    image_paths: list[Path] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BenchmarkFormatError(f"{path}: neither a pickle nor a UTF-8 text pair list ({err})") from err
    except OSError as err:
        raise BenchmarkFormatError(f"cannot read pair list {path}: {err.strerror}") from err
    for line_number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise BenchmarkFormatError(
                f"{path}:{line_number}: expected 'label path0 path1' with label 0 or 1, found {line.strip()!r}"
            )
        labels.append(fields[0] == "1")
        image_paths.extend([root / fields[1], root / fields[2]])
    if not labels:
        raise BenchmarkFormatError(f"{path}: no pairs found")
    position: dict[Path, int] = {}
    for image_path in image_paths:
        position.setdefault(image_path, len(position))
    for image_path in position:
        if not image_path.is_file():
            raise BenchmarkFormatError(f"{path}: cannot read image {image_path}: no such file")
    return EncodedPairs(
        path,
        list(position),
        np.array([position[p] for p in image_paths], dtype=np.int64),
        np.array(labels, dtype=np.bool_),
    )


def read_pairs(path: str | os.PathLike) -> EncodedPairs:
    """A `.bin` pickle (recognised by its first byte) or a text pair list, read and checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as err:
        raise BenchmarkFormatError(f"cannot read benchmark {path}: {err.strerror}") from err
    if first == PICKLE_MAGIC:
        return read_bin(path)
    if path.suffix == ".bin":
        raise BenchmarkFormatError(f"{path}: a .bin verification file must be a pickle (protocol 2 or higher)")
    return read_pair_list(path)


def load_bin(path: str | os.PathLike) -> PairSet:
    """`read_bin` with every image decoded: uint8 [2n, H, W, 3] and the n same/different labels."""
    return read_bin(path).load()


def load_pair_list(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PairSet:
    """`read_pair_list` with every image decoded (each distinct image once)."""
    return read_pair_list(path, image_root).load()


def load_pairs(path: str | os.PathLike) -> PairSet:
    """`read_pairs` with every image decoded."""
    return read_pairs(path).load()
