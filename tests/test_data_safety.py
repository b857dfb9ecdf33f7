"""Data files never run code and bad data gives one-line ``DataError``s naming the file.

The CIFAR batches are read with a restricted unpickler: the real (Python 2, protocol 2)
layout and numpy's own protocol 2/4/5 pickles load; anything that names another global,
even one that would return valid-looking data, is refused before it is called.
"""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparse_adv_fast import data


# ---- fake files in the real formats -----------------------------------------------------
def _idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    magic = magic or struct.pack(">HBB", 0, 0x08, arr.ndim)
    return magic + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n_train: int = 5, n_test: int = 3, side: int = 28) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
        labs = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(_idx_bytes(labs))


def _sbs(b: bytes) -> bytes:
    """Python 2's str as pickled by cPickle: SHORT_BINSTRING or BINSTRING."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)  # BININT


def _py2_batch(x: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch byte for byte as Python 2's cPickle (protocol 2) wrote the official
    files with numpy 1.x: ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype`` are its only globals, and every string is a py2 ``str``."""
    n = x.shape[0]
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n"
        + _int(0) + b"\x85" + _sbs(b"b") + b"\x87R"             # _reconstruct(ndarray, (0,), 'b')
        + b"(" + _int(1) + _int(n) + _int(3072) + b"\x86"      # state: version, shape,
        + b"cnumpy\ndtype\n" + _sbs(b"u1") + b"\x89\x88\x87R"  # dtype('u1', False, True)
        + b"(" + _int(3) + _sbs(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
        + b"\x89" + _sbs(x.astype(np.uint8).tobytes()) + b"tb"  # is_fortran, raw bytes
    )
    label_list = b"](" + b"".join(_int(v) for v in labels) + b"e"
    names = b"](" + b"".join(_sbs(f"img_{i}.png".encode()) for i in range(n)) + b"e"
    return (
        b"\x80\x02}("
        + _sbs(b"batch_label") + _sbs(b"training batch 1 of 5")
        + _sbs(b"labels") + label_list + _sbs(b"data") + array
        + _sbs(b"filenames") + names + b"u."
    )


def _batch(n: int = 3, seed: int = 0) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def _write_cifar(folder: Path, *, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(data.CIFAR_FILES):
        batches[name] = _batch(seed=i)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    return batches


def _globals_in(raw: bytes) -> set[str]:
    """The globals a pickle references (GLOBAL and STACK_GLOBAL after two strings)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(raw):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def _refused(folder: Path, name: str = "data_batch_1") -> str:
    with pytest.raises(data.DataError) as e:
        data.load("cifar10", folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / name) in msg and "refused" in msg
    return msg


# ---- the real format loads --------------------------------------------------------------
def test_python2_cifar_layout_loads_and_matches_plain_pickle(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {}
    for name in data.CIFAR_FILES:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 4)]
        raw = _py2_batch(x, y)
        arrays[name] = (x, y)
        (tmp_path / name).write_bytes(raw)
    # the globals of the official files, and what plain pickle makes of our bytes
    assert _globals_in(raw) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray",
                                "numpy.dtype"}
    with warnings.catch_warnings():  # numpy 2 may warn that numpy.core is an alias
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = pickle.loads(raw, encoding="bytes")
    assert np.array_equal(plain[b"data"], arrays["test_batch"][0])
    train, test = data.load("cifar10", tmp_path)
    x_tr = np.concatenate([arrays[f][0] for f in data.CIFAR_FILES[:5]])
    assert np.array_equal(train.tensors[0].numpy().reshape(20, 3072), x_tr / np.float32(255))
    assert train.tensors[1].tolist() == sum((arrays[f][1] for f in data.CIFAR_FILES[:5]), [])
    assert test.tensors[1].tolist() == arrays["test_batch"][1]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    batches = _write_cifar(tmp_path, protocol=protocol)
    train, test = data.load("cifar10", tmp_path)
    assert np.array_equal(test.tensors[0].numpy().reshape(3, 3072) * 255,
                          batches["test_batch"][b"data"].astype(np.float32))
    assert test.tensors[1].tolist() == batches["test_batch"][b"labels"]
    assert len(train) == 15


def test_numpy_integer_labels_load_and_float_ones_do_not(tmp_path):
    batches = _write_cifar(tmp_path)
    b = {**batches["test_batch"], b"labels": [np.int64(v) for v in [1, 2, 3]]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(b, protocol=2))
    assert data.load("cifar10", tmp_path)[1].tensors[1].tolist() == [1, 2, 3]
    b[b"labels"] = np.array([4, 5, 6], np.uint8)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(b, protocol=4))
    assert data.load("cifar10", tmp_path)[1].tensors[1].tolist() == [4, 5, 6]
    b[b"labels"] = np.array([4, 5, 6], np.float32)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(b, protocol=4))
    _data_error("cifar10", tmp_path, str(tmp_path / "test_batch"), "float32")


# ---- crafted pickles never run ----------------------------------------------------------
class _Exec:
    """Unpickles as ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _Shell:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_exec_payload_never_runs_and_error_names_file_and_global(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exec(f"open({str(marker)!r}, 'w').close()"), protocol=2)
    # the payload is live: plain pickle runs it
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    (tmp_path / "data_batch_1").write_bytes(payload)
    msg = _refused(tmp_path)
    assert "builtins.exec" in msg and not marker.exists()


def test_shell_payload_inside_valid_data_never_runs(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = {**_batch(), b"batch_label": _Shell(f"touch {marker}")}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    msg = _refused(tmp_path)
    assert f"{os.system.__module__}.system" in msg and not marker.exists()


class _Dict:
    """Unpickles as a valid batch built by ``builtins.dict``: no sign of anything wrong."""

    def __reduce__(self):
        return (dict, (list(_batch().items()),))


class _Eval:
    def __reduce__(self):
        return (eval, ("{b'data': __import__('numpy').zeros((3, 3072), 'uint8'), "
                       "b'labels': [0, 1, 2]}",))


@pytest.mark.parametrize("payload, name", [(_Dict(), "builtins.dict"),
                                           (_Eval(), "builtins.eval")])
def test_payload_returning_valid_data_is_refused(tmp_path, payload, name):
    _write_cifar(tmp_path)
    raw = pickle.dumps(payload, protocol=2)
    assert pickle.loads(raw)[b"labels"]  # plain pickle would accept it as a batch
    (tmp_path / "data_batch_1").write_bytes(raw)
    assert name in _refused(tmp_path)


def _reduce_bytes(module: str, name: str, args: bytes) -> bytes:
    """A protocol-2 pickle that calls ``module.name`` on the pickled tuple ``args``."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + args + b"R."


@pytest.mark.parametrize("raw, what", [
    # numpy.ndarray itself would allocate any shape the file names
    (_reduce_bytes("numpy", "ndarray", b"J\x00\x00\x00\x40\x85\x85"), "ndarray called"),
    # _reconstruct only ever builds an empty int8 array before its state is checked
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
     b"J\x00\x00\x00\x40\x85U\x01b\x87R.", "_reconstruct"),
    # other codecs than latin1 are not the protocol-2 bytes idiom
    (_reduce_bytes("_codecs", "encode", b"X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86"),
     "zlib"),
    (_reduce_bytes("numpy", "dtype", b"X\x01\x00\x00\x00O\x85"), "dtype"),
])
def test_numpy_globals_are_admitted_only_in_their_safe_form(tmp_path, raw, what):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(raw)
    assert what in _refused(tmp_path)


def test_object_and_structured_arrays_are_refused(tmp_path):
    _write_cifar(tmp_path)
    for arr in (np.array([1, 2], dtype=object), np.zeros(2, dtype=[("a", "u1")])):
        for protocol in (2, 5):
            batch = {**_batch(), b"extra": arr}
            (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
            assert "dtype" in _refused(tmp_path)


def test_array_state_must_hold_its_bytes(tmp_path):
    _write_cifar(tmp_path)
    raw = _py2_batch(np.zeros((2, 3072), np.uint8), [0, 1])
    # the header claims 2**20 rows of 3072 bytes, but the file holds two
    forged = raw.replace(_int(2) + _int(3072), _int(1 << 20) + _int(3072))
    assert forged != raw
    (tmp_path / "data_batch_1").write_bytes(forged)
    assert "bytes" in _refused(tmp_path)


# ---- one-line data errors ---------------------------------------------------------------
def _data_error(name: str, folder: Path, *fragments: str) -> str:
    with pytest.raises(data.DataError) as e:
        data.load(name, folder)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("labels", [["3", "1", "4"], [b"cat", b"dog", b"cow"], [1, 2.0, 3],
                                    [True, 1, 2]])
def test_cifar_non_int_labels_name_the_file(tmp_path, labels):
    _write_cifar(tmp_path)
    bad = tmp_path / "data_batch_4"
    bad.write_bytes(pickle.dumps({**_batch(), b"labels": labels}, protocol=2))
    first_bad = next(i for i, v in enumerate(labels) if type(v) is not int)
    _data_error("cifar10", tmp_path, str(bad), f"label {first_bad} is")


def test_cifar_count_mismatch_and_empty_batch(tmp_path):
    _write_cifar(tmp_path)
    bad = tmp_path / "test_batch"
    bad.write_bytes(pickle.dumps({**_batch(n=3), b"labels": [1, 2]}, protocol=2))
    _data_error("cifar10", tmp_path, str(bad), "3 images", "2 'labels'")
    bad.write_bytes(pickle.dumps(_batch(n=0), protocol=2))
    _data_error("cifar10", tmp_path, str(bad), "empty dataset")


def test_directory_where_a_file_is_expected(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_2").unlink()
    (tmp_path / "data_batch_2").mkdir()
    _data_error("cifar10", tmp_path, str(tmp_path / "data_batch_2"), "is a directory")
    mnist = tmp_path / "mnist"
    _write_mnist(mnist)
    (mnist / "t10k-labels-idx1-ubyte").unlink()
    (mnist / "t10k-labels-idx1-ubyte").mkdir()
    _data_error("mnist", mnist, str(mnist / "t10k-labels-idx1-ubyte"), "is a directory")


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "data_batch_1"
    f.write_bytes(b"x")
    _data_error("cifar10", f, str(f), "is a file, not a directory")


def test_missing_files_are_a_data_error_and_file_not_found(tmp_path):
    with pytest.raises(data.DataFilesNotFound) as e:
        data.load("mnist", tmp_path)
    assert isinstance(e.value, data.DataError) and isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("side", [32, 8])
def test_mnist_images_not_28x28_name_file_and_shape(tmp_path, side):
    _write_mnist(tmp_path, side=side)
    _data_error("mnist", tmp_path, str(tmp_path / "train-images-idx3-ubyte"),
                f"(5, {side}, {side})")


def test_mnist_empty_split_names_the_file(tmp_path):
    _write_mnist(tmp_path, n_test=0)
    _data_error("mnist", tmp_path, "empty dataset", str(tmp_path / "t10k-images-idx3-ubyte"))


@pytest.mark.parametrize("magic", [b"\x00\x00\x09\x03", b"\x01\x00\x08\x03", b"\x00\x00\x08\x02"])
def test_mnist_bad_magic_names_file_and_magic(tmp_path, magic):
    _write_mnist(tmp_path)
    img = tmp_path / "t10k-images-idx3-ubyte"
    img.write_bytes(magic + img.read_bytes()[4:])
    _data_error("mnist", tmp_path, str(img), f"got 0x{magic.hex()}")


def test_mnist_forged_header_is_refused_without_reading_it(tmp_path):
    _write_mnist(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte").unlink()
    # 2**32 - 1 images of 28x28 claimed, no data: over the cap, refused from the header
    img.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 2**32 - 1, 28, 28)))
    _data_error("mnist", tmp_path, str(img), "limit")
    img.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 1000, 28, 28) + b"\0" * 99))
    _data_error("mnist", tmp_path, str(img), "found 99 bytes")


def test_mnist_trailing_bytes_are_malformed(tmp_path):
    _write_mnist(tmp_path)
    lab = tmp_path / "train-labels-idx1-ubyte"
    lab.write_bytes(lab.read_bytes() + b"\x01")
    _data_error("mnist", tmp_path, str(lab), "found 6+ bytes")
