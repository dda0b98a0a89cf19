"""Verification pair sets from disk: InsightFace `.bin` files and `label path0 path1` pair lists.

A `.bin` file is a pickle of `(list of encoded images, list of bools)`; pair i is images 2i
and 2i+1 (DESIGN.md, Formats). Loading a pickle can run any function it names, so these
files go through `SafeUnpickler`, which admits only the globals such files are made of:

- `_codecs.encode(text, "latin1")`: how Python 3 writes `bytes` at pickle protocol 2;
- numpy's array, scalar and dtype reconstruction, for label lists stored as numpy bools
  (only the bool dtype is accepted).

Any other global is refused before it is looked up, with an `UnsafePickleError` naming it and
the file. The synthetic held-out sets of `sf2dist.data` use the same layout (protocol 4).
"""
from __future__ import annotations

import _codecs
import os
import pickle
from pathlib import Path
from typing import Any, NamedTuple

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


def _decode_all(encoded: list[bytes], where: list[str]) -> np.ndarray:
    """Decode every image into one uint8 [N, H, W, 3] array; all must share one size."""
    images: np.ndarray | None = None
    for index, data in enumerate(encoded):
        try:
            image = decode_image(data)
        except ImageDecodeError as err:
            raise BenchmarkFormatError(f"{where[index]}: {err}") from err
        if images is None:
            images = np.empty((len(encoded), *image.shape), dtype=np.uint8)
        elif image.shape != images.shape[1:]:
            raise BenchmarkFormatError(
                f"{where[index]}: image is {image.shape[1]}x{image.shape[0]} but the first one is "
                f"{images.shape[2]}x{images.shape[1]}; every image of a benchmark must have the model's input size"
            )
        images[index] = image
    assert images is not None
    return images


def load_bin(path: str | os.PathLike) -> PairSet:
    """Read an InsightFace `.bin` verification file (or a synthetic held-out set) safely.

    Returns the decoded images (uint8 [2n, H, W, 3]) and the n same/different labels.
    Raises `UnsafePickleError` if the pickle names any global outside the allow-list and
    `BenchmarkFormatError` if its content is not (list of 2n encoded images, n bools).
    """
    path = Path(path)
    images, labels = _validated_pairs(_load_pickle(path), path)
    return PairSet(_decode_all(images, [f"{path}: image {i}" for i in range(len(images))]), labels)


def load_pair_list(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PairSet:
    """Read a pair list: one `label path0 path1` per line, label 1 (same) or 0 (different).

    Relative image paths are taken from `image_root`, by default the list's own folder.
    Blank lines and lines starting with `#` are skipped. Each distinct image is decoded once.
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
    distinct = list(dict.fromkeys(image_paths))
    encoded = []
    for image_path in distinct:
        try:
            encoded.append(image_path.read_bytes())
        except OSError as err:
            raise BenchmarkFormatError(f"{path}: cannot read image {image_path}: {err.strerror}") from err
    decoded = _decode_all(encoded, [str(p) for p in distinct])
    position = {image_path: i for i, image_path in enumerate(distinct)}
    return PairSet(decoded[[position[p] for p in image_paths]], np.array(labels, dtype=np.bool_))


def load_pairs(path: str | os.PathLike) -> PairSet:
    """A `.bin` pickle (recognised by its first byte) or a text pair list."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as err:
        raise BenchmarkFormatError(f"cannot read benchmark {path}: {err.strerror}") from err
    if first == PICKLE_MAGIC:
        return load_bin(path)
    if path.suffix == ".bin":
        raise BenchmarkFormatError(f"{path}: a .bin verification file must be a pickle (protocol 2 or higher)")
    return load_pair_list(path)
