"""cffi build script for the native kernels (API mode) → module ``bdecomp.native._kernels``.

Used by setup.py at install time (``pip install .``: ``cffi_modules=["native/build_ffi.py:ffibuilder"]``).
For an in-place development build run ``python native/build_ffi.py`` (writes the extension next to
this file's package path under the current directory).

Environment at build time:
  BDECOMP_SANITIZE=1   compile and link with -fsanitize=address,undefined (run python with
                       LD_PRELOAD=$(gcc -print-file-name=libasan.so) to load the result).

The cdef is native/bdecomp.h itself, minus its preprocessor lines (`_cdef`).
"""
import glob
import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef(header: str) -> str:
    """The header as cffi's cdef takes it: declarations as they stand (cffi drops the comments),
    each BD_* constant as `#define NAME ...` (its value comes from the compiled header), the
    include guard and includes left out. So the Python binding cannot drift from bdecomp.h."""
    lines = []
    for line in header.splitlines():
        constant = re.match(r"\s*#\s*define\s+(BD_\w+)\s", line)
        if constant:
            lines.append(f"#define {constant.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            lines.append(line)
    return "\n".join(lines)


with open(os.path.join(HERE, "bdecomp.h"), encoding="utf-8") as f:
    CDEF = _cdef(f.read())

SOURCES = sorted(os.path.basename(f) for f in glob.glob(os.path.join(HERE, "*.c")))


def _path(name):
    """Path of a file of this directory as distutils wants it (relative to cwd when possible)."""
    full = os.path.join(HERE, name)
    try:
        rel = os.path.relpath(full)
    except ValueError:  # other drive (Windows)
        return full
    return full if rel.startswith("..") else rel


_compile_args = ["-O3", "-fopenmp", "-std=c11", "-fno-strict-aliasing", "-ffp-contract=off"]
_link_args = ["-fopenmp"]
if os.environ.get("BDECOMP_SANITIZE", "") not in ("", "0"):
    _san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    # -O1: the sanitizer build is for finding bugs, and -O3 with ASan takes minutes to compile
    _compile_args = [a for a in _compile_args if not a.startswith("-O")] + ["-O1"]
    _compile_args += _san + ["-fno-sanitize-recover=undefined"]
    _link_args += _san

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "bdecomp.native._kernels",
    '#include "bdecomp.h"',
    sources=[_path(f) for f in SOURCES],
    include_dirs=[HERE],
    depends=[_path(f) for f in ("bdecomp.h", "kernels.h", "reference.h", "output_transform.h", "epilogue_avx2.h",
                                "conv_driver.inc", "lut_driver.inc", "kernel_lut_avx2.c")],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
