"""Property-based fuzzing: the parsers of model specs, IDX files, configs, checkpoints and
weights fail only with cnnlab's own error types, whatever they are given."""

from __future__ import annotations

import contextlib
import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab.config import RunConfig
from cnnlab.data.idx import read_idx
from cnnlab.errors import CheckpointError, CnnlabError, DataError
from cnnlab.models.layers import _SCHEMAS, LAYERS, infer_shapes, parse_spec
from cnnlab.training.checkpoint import load_checkpoint, load_weights

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["same", "valid", "relu", "softmax", "he_normal", "3", "", "x" * 40]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
arg_names = st.sampled_from(sorted({a for schema in _SCHEMAS.values() for a in schema}))
layer_names = st.one_of(st.sampled_from(sorted(LAYERS)), st.text(max_size=10), scalars)
layers = st.one_of(
    st.builds(
        lambda k, a: {k: a},
        st.sampled_from(sorted(LAYERS)),
        st.dictionaries(arg_names, values, max_size=4),
    ),
    st.builds(lambda k, a: {k: a}, layer_names, values),
    layer_names,
    values,
)
small = st.integers(min_value=-2, max_value=40)


@FUZZ
@given(
    spec=st.one_of(st.lists(layers, max_size=6), values),
    shape=st.one_of(st.tuples(small, small, small), values),
    classes=st.one_of(small, values),
)
def test_model_spec_parser_raises_only_cnnlab_errors(spec, shape, classes) -> None:
    with contextlib.suppress(CnnlabError):
        parse_spec(spec)
        infer_shapes(spec, shape, classes)


def _read(data: bytes) -> np.ndarray | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz-idx"
        path.write_bytes(data)
        try:
            return read_idx(path)
        except DataError as exc:
            assert str(path) in str(exc)  # every message names the file
            return None


idx_headers = st.builds(
    lambda code, dims: (
        bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    ),
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]),
    st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), max_size=9),
)


@FUZZ
@given(
    header=st.one_of(idx_headers, st.binary(max_size=12)),
    payload=st.binary(max_size=300),
    compress=st.booleans(),
)
def test_idx_parser_raises_only_data_errors(header: bytes, payload: bytes, compress: bool) -> None:
    data = header + payload
    if compress:
        data = gzip.compress(data)
    array = _read(data)
    if array is not None:
        assert array.nbytes == len(header + payload) - 4 - 4 * header[3]


@FUZZ
@given(data=st.binary(max_size=400), cut=st.integers(0, 400))
def test_damaged_gzip_idx_is_a_data_error(data: bytes, cut: int) -> None:
    _read(gzip.compress(data)[:cut])


@FUZZ
@given(
    raw=st.one_of(
        values,
        st.dictionaries(
            st.sampled_from(["train", "data", "model", "seed", "name", "x"]), values, max_size=4
        ),
    )
)
def test_config_parser_raises_only_config_errors(raw) -> None:
    with contextlib.suppress(CnnlabError):
        RunConfig.from_dict(raw)


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_as_checkpoint_or_weights_are_refused(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, load in (("last.ckpt", load_checkpoint), ("best.safetensors", load_weights)):
            path = Path(folder) / name
            path.write_bytes(data)
            try:
                load(path)
            except CheckpointError as exc:
                assert str(path) in str(exc)
