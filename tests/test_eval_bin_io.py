"""Loading verification sets: genuine `.bin` files load, anything carrying code is refused."""
import copyreg
import pickle
import struct

import numpy as np
import pytest

from sf2dist.eval import BenchmarkFormatError, UnsafePickleError, load_bin, load_pair_list, load_pairs
from sf2dist.imageio import decode_image, encode_jpeg

CALLS = []


def record_call(*args):
    """What a malicious pickle would run; the tests check it never is."""
    CALLS.append(args)
    return b"not an image"


class CallsOnLoad:
    def __reduce__(self):
        return record_call, ("loaded",)


def face(seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def jpegs(count):
    return [encode_jpeg(face(i)) for i in range(count)]


def write(path, data):
    path.write_bytes(data)
    return path


@pytest.fixture(autouse=True)
def no_calls():
    CALLS.clear()
    yield
    assert CALLS == [], "a function named in a pickle was called"


def test_synthetic_held_out_set_in_protocol_4_loads(tmp_path):
    images, issame = jpegs(6), [True, False, True]
    path = write(tmp_path / "heldout.bin", pickle.dumps((images, issame), protocol=4))
    pairs = load_bin(path)
    assert pairs.images.shape == (6, 16, 16, 3) and pairs.images.dtype == np.uint8
    np.testing.assert_array_equal(pairs.images[3], decode_image(images[3]))
    np.testing.assert_array_equal(pairs.issame, issame)
    images_again, issame_again = load_bin(path)  # unpacks as (images, issame)
    np.testing.assert_array_equal(images_again, pairs.images)


def test_python3_protocol_2_with_numpy_labels_loads(tmp_path):
    # Protocol 2 stores bytes as _codecs.encode(text, "latin1") and numpy bools by reduction.
    images = jpegs(4)
    data = pickle.dumps((images, np.array([False, True])), protocol=2)
    assert b"_codecs" in data and b"_reconstruct" in data
    pairs = load_bin(write(tmp_path / "p2.bin", data))
    np.testing.assert_array_equal(pairs.issame, [False, True])
    data = pickle.dumps((images, [np.bool_(True), np.bool_(False)]), protocol=5)
    assert b"scalar" in data
    np.testing.assert_array_equal(load_bin(write(tmp_path / "p5.bin", data)).issame, [True, False])


def python2_style_pickle(images, issame):
    """What Python 2's cPickle.dump((images, issame), f, protocol=2) writes: str -> BINSTRING."""
    out = b"\x80\x02" + b"]" + b"("
    for image in images:
        out += b"T" + struct.pack("<I", len(image)) + image
    out += b"e" + b"](" + b"".join(b"\x88" if same else b"\x89" for same in issame) + b"e"
    return out + b"\x86" + b"."


def test_python2_insightface_layout_loads(tmp_path):
    images = jpegs(4)
    pairs = load_bin(write(tmp_path / "lfw.bin", python2_style_pickle(images, [True, False])))
    np.testing.assert_array_equal(pairs.images[0], decode_image(images[0]))
    np.testing.assert_array_equal(pairs.issame, [True, False])


def test_pickle_that_would_call_a_function_is_refused(tmp_path):
    data = pickle.dumps(([encode_jpeg(face(0)), CallsOnLoad()], [True]), protocol=4)
    path = write(tmp_path / "evil.bin", data)
    with pytest.raises(UnsafePickleError, match=r"record_call") as info:
        load_bin(path)
    assert str(path) in str(info.value) and "nothing from the file was executed" in str(info.value)


@pytest.mark.parametrize(
    "data, refused",
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),  # protocol 0 GLOBAL + REDUCE
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.", "os.system"),  # STACK_GLOBAL
        (b"(cos\nsystem\nS'true'\no.", "os.system"),  # OBJ builds an instance via a global
        (b"\x80\x02\x82\xf0X\x04\x00\x00\x00true\x85R.", "os.system"),  # EXT1 code 240, registered below
    ],
)
def test_every_way_of_naming_a_global_is_checked(tmp_path, data, refused):
    copyreg.add_extension("os", "system", 240)
    try:
        with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")):
            load_bin(write(tmp_path / "evil.bin", data))
    finally:
        copyreg.remove_extension("os", "system", 240)


def test_admitted_globals_are_restricted_to_harmless_uses(tmp_path):
    text_codec = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafePickleError, match="latin1"):
        load_bin(write(tmp_path / "codec.bin", text_codec))
    object_array = pickle.dumps((jpegs(2), np.array([True, "x"], dtype=object)), protocol=2)
    with pytest.raises(UnsafePickleError, match="numpy dtype object"):
        load_bin(write(tmp_path / "objects.bin", object_array))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": []}, "expected a pickle of \\(images, issame\\), found a dict"),
        ((jpegs(3), [True]), "even, non-zero number of images"),
        ((jpegs(4), [True]), "4 images make 2 pairs but issame has 1 labels"),
        ((jpegs(2), [1]), r"issame\[0\] is a int, expected a bool"),
        (([b"x", "text"], [True]), "image 1 is a str"),
        (([encode_jpeg(face(0)), b"garbage"], [True]), "image 1: cannot decode image"),
        (([encode_jpeg(face(0)), encode_jpeg(face(1, size=8))], [True]), "image 1: image is 8x8 but the first one is 16x16"),
    ],
)
def test_malformed_content_is_reported(tmp_path, content, message):
    with pytest.raises(BenchmarkFormatError, match=message):
        load_bin(write(tmp_path / "bad.bin", pickle.dumps(content, protocol=4)))


def test_truncated_pickle_is_reported(tmp_path):
    data = pickle.dumps((jpegs(2), [True]), protocol=4)
    with pytest.raises(BenchmarkFormatError, match="not a readable pickle"):
        load_bin(write(tmp_path / "cut.bin", data[: len(data) // 2]))


def test_pair_list_over_an_image_folder(tmp_path):
    for name, seed in [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 2)]:
        write(tmp_path / name, encode_jpeg(face(seed)))
    (tmp_path / "pairs.txt").write_text("# label path0 path1\n1 a.jpg b.jpg\n\n0 a.jpg c.jpg\n")
    pairs = load_pairs(tmp_path / "pairs.txt")
    np.testing.assert_array_equal(pairs.issame, [True, False])
    np.testing.assert_array_equal(pairs.images[2], pairs.images[0])  # a.jpg twice
    np.testing.assert_array_equal(pairs.images[3], decode_image((tmp_path / "c.jpg").read_bytes()))
    (tmp_path / "bad.txt").write_text("1 a.jpg b.jpg\nyes a.jpg c.jpg\n")
    with pytest.raises(BenchmarkFormatError, match=r"bad.txt:2: expected 'label path0 path1'"):
        load_pair_list(tmp_path / "bad.txt")
    (tmp_path / "missing.txt").write_text("1 a.jpg nowhere.jpg\n")
    with pytest.raises(BenchmarkFormatError, match="cannot read image .*nowhere.jpg"):
        load_pair_list(tmp_path / "missing.txt")


def test_bin_that_is_not_a_pickle_is_reported(tmp_path):
    with pytest.raises(BenchmarkFormatError, match="must be a pickle"):
        load_pairs(write(tmp_path / "x.bin", b"PK\x03\x04 zip, not pickle"))
