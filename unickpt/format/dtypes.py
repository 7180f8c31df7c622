"""Dtype names as written in the manifest, and their safetensors codes.

Only dtypes on an explicit allow-list can be read back: a manifest can never make the reader
construct an object dtype (or any dtype from an arbitrary string).

``ml_dtypes`` (bfloat16, float8, int4, ...) is imported on first use of one of its names, not
at import: it used to be most of ``import unickpt``'s start-up time, and a checkpoint without
those dtypes never needs it.
"""

from __future__ import annotations

import re
import threading

import numpy as np

# numpy dtype name -> safetensors code.  Dtypes safetensors has no code for are stored as "U8"
# (raw little-endian bytes); the manifest keeps the true dtype.
_SAFETENSORS_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
}

_NUMPY_NAMES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]
_ML_DTYPES_NAMES = [
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int1", "int2", "int4", "uint1", "uint2", "uint4",
]

_ML_DTYPES_SET = frozenset(_ML_DTYPES_NAMES)
_BY_NAME: dict[str, np.dtype] = {}
for _n in _NUMPY_NAMES:
    _dt = np.dtype(_n)
    _BY_NAME[_dt.name] = _dt
_ml_loaded = False
_ml_lock = threading.Lock()


def _load_ml_dtypes() -> None:
    """Add the ``ml_dtypes`` types to the allow-list (once, on first need)."""
    global _ml_loaded
    with _ml_lock:
        if _ml_loaded:
            return
        import ml_dtypes

        for n in _ML_DTYPES_NAMES:
            if hasattr(ml_dtypes, n):  # older ml_dtypes lack some of the newer types
                _BY_NAME[n] = np.dtype(getattr(ml_dtypes, n))
        _ml_loaded = True


# ``long double`` differs between platforms (x87 80-bit extended on x86-64, IEEE binary128 on
# aarch64 Linux, plain double on Windows), yet numpy names both 16-byte variants "float128".
# The manifest therefore names the bit format, and a reader refuses one its platform lacks.
def _longdouble_names() -> tuple[str, str] | None:
    fi = np.finfo(np.longdouble)
    if np.dtype(np.longdouble).itemsize == 16 and fi.nmant == 63 and fi.nexp == 15:
        return "float80_x87", "complex_float80_x87"
    if np.dtype(np.longdouble).itemsize == 16 and fi.nmant == 112 and fi.nexp == 15:
        return "float128_ieee", "complex_float128_ieee"
    return None  # same as double (then saved as float64), or a format the spec does not name


_LONGDOUBLE = _longdouble_names()
_LONGDOUBLE_ALL = ("float80_x87", "complex_float80_x87", "float128_ieee", "complex_float128_ieee")
if _LONGDOUBLE is not None and np.dtype(np.longdouble) != np.dtype(np.float64):
    _BY_NAME[_LONGDOUBLE[0]] = np.dtype(np.longdouble)
    _BY_NAME[_LONGDOUBLE[1]] = np.dtype(np.clongdouble)

_TIME_RE = re.compile(r"^(datetime64|timedelta64)\[(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\]$")
_FIXED_RE = re.compile(r"^([SUV])([0-9]{1,9})$")
# numpy refuses fixed-width dtypes whose item size does not fit a C int ("U999999999" is
# 4 GB per item); the format refuses them with the same bound, as an unsupported dtype.
MAX_ITEMSIZE = (1 << 31) - 1


class UnsupportedDtype(TypeError):
    """Raised for dtypes the format does not store (object, structured)."""


def dtype_name(dtype: np.dtype) -> str:
    """The manifest name of ``dtype`` (byte order is stored separately).

    >>> import ml_dtypes
    >>> dtype_name(np.dtype(">f4")), dtype_name(np.dtype(ml_dtypes.bfloat16))
    ('float32', 'bfloat16')
    """
    if not _ml_loaded and dtype.name in _ML_DTYPES_SET:
        _load_ml_dtypes()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsupportedDtype(f"dtype {dtype!r} cannot be stored (object or structured dtype)")
    native = dtype.newbyteorder("=")
    if _LONGDOUBLE is not None and native in (np.dtype(np.longdouble), np.dtype(np.clongdouble)) \
            and np.dtype(np.longdouble) != np.dtype(np.float64):
        return _LONGDOUBLE[0] if dtype.kind == "f" else _LONGDOUBLE[1]
    if dtype.name in _BY_NAME and _BY_NAME[dtype.name] == native:
        return dtype.name
    if dtype.kind in "mM":
        name = dtype.newbyteorder("=").name
        if _TIME_RE.match(name) is None:
            raise UnsupportedDtype(f"dtype {dtype!r} (generic time unit) cannot be stored")
        return name
    if dtype.kind in "SUV":
        n = dtype.itemsize // 4 if dtype.kind == "U" else dtype.itemsize
        if dtype.kind == "V" and type(dtype) is not np.dtypes.VoidDType:
            raise UnsupportedDtype(f"dtype {dtype!r} cannot be stored")
        return f"{dtype.kind}{n}"
    name = dtype.name
    if name not in _BY_NAME:
        raise UnsupportedDtype(f"dtype {dtype!r} is not supported by the unickpt format")
    return name


def dtype_from_name(name: object) -> np.dtype:
    """Parse a manifest dtype name; anything off the allow-list raises ``UnsupportedDtype``.

    >>> dtype_from_name("U3"), dtype_from_name("bfloat16").name
    (dtype('<U3'), 'bfloat16')
    >>> dtype_from_name("U999999999")
    Traceback (most recent call last):
    ...
    unickpt.format.dtypes.UnsupportedDtype: dtype 'U999999999' is too wide (3999999996 bytes per item, limit 2147483647)
    """
    if not isinstance(name, str):
        raise UnsupportedDtype(f"dtype name must be a string, got {type(name).__name__}")
    dt = _BY_NAME.get(name)
    if dt is not None:
        return dt
    if name in _ML_DTYPES_SET and not _ml_loaded:
        _load_ml_dtypes()
        if name in _BY_NAME:
            return _BY_NAME[name]
    if name in _LONGDOUBLE_ALL:
        raise UnsupportedDtype(f"dtype {name!r} (a long double format) does not exist on this "
                               "platform; read this checkpoint on a machine with that format")
    if _TIME_RE.match(name):
        return np.dtype(name)
    m = _FIXED_RE.match(name)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if n == 0 and kind != "V":
            raise UnsupportedDtype(f"zero-width dtype {name!r}")
        if n * (4 if kind == "U" else 1) > MAX_ITEMSIZE:
            raise UnsupportedDtype(f"dtype {name!r} is too wide ({n * (4 if kind == 'U' else 1)}"
                                   f" bytes per item, limit {MAX_ITEMSIZE})")
        return np.dtype(f"{'<' if kind == 'U' else '|'}{kind}{n}")
    raise UnsupportedDtype(f"unknown dtype {name!r}")


def allowed_dtypes() -> dict[str, np.dtype]:
    """Every fixed (non-parametric) dtype on the allow-list, by manifest name.

    Fixed-width ``S``/``U``/``V`` and ``datetime64``/``timedelta64`` units are not listed.

    >>> allowed_dtypes()["bfloat16"].itemsize
    2
    """
    _load_ml_dtypes()
    order = {n: k for k, n in enumerate([*_NUMPY_NAMES, *_ML_DTYPES_NAMES])}
    return {n: _BY_NAME[n] for n in sorted(_BY_NAME, key=lambda n: order.get(n, len(order)))}


def safetensors_code(name: str) -> str:
    """The safetensors dtype code used for the array's bytes ("U8" when it has none)."""
    return _SAFETENSORS_CODES.get(name, "U8")


def has_byteorder(dtype: np.dtype) -> bool:
    """Whether ``dtype`` can be big-endian (multi-byte builtin numbers, times and ``U``).

    ``ml_dtypes`` types cannot: numpy turns a byte-swapped bfloat16 into a plain void dtype.
    """
    return (dtype.itemsize > 1 and dtype.kind in "iufcmMU"
            and dtype.newbyteorder(">").kind == dtype.kind)
