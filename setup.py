"""Build hook: cffi compiles native/*.c into bdecomp.native._kernels (API mode) at install time."""
from setuptools import setup
from setuptools.command.build_py import build_py as _build_py


class build_py(_build_py):
    """Keep this file out of the installed package (the repository root maps to `bdecomp`)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "bdecomp" and m[1] == "setup")]


setup(cffi_modules=["native/build_ffi.py:ffibuilder"], cmdclass={"build_py": build_py})
