"""Build the C kernels (plain C + OpenMP, loaded with ctypes) at install time: the channel-sparse
FFN (``_csffn``) and the native quantized decode step (``_csdec``).

Everything else about the package lives in pyproject.toml. The kernel is compiled for the
machine that installs the package (``-march=native``): the runtime is meant to be installed
where it runs. To build a portable wheel, set ``CSCOMPILE_CFLAGS`` (for example
``-O3 -march=x86-64-v3``). If the build fails, the package still installs and the runtime
compiles the kernel on first use (see ``cscompile/motifs/kernel.py``).
"""

import os
import shlex

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CFLAGS = shlex.split(os.environ.get("CSCOMPILE_CFLAGS", "-O3 -march=native")) + [
    "-fopenmp",
    "-fno-math-errno",
    "-std=c11",
]


class OptionalBuildExt(build_ext):
    """Never fail the install over the kernel: the runtime has an on-demand build."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            print(f"cscompile: kernel build failed ({exc}); it will be compiled on first use")

    def get_export_symbols(self, ext):  # a ctypes library, not a Python module
        return []


setup(
    ext_modules=[
        Extension(
            "cscompile.motifs._csffn",
            sources=["cscompile/motifs/csrc/sparse_ffn.c"],
            extra_compile_args=CFLAGS,
            extra_link_args=["-fopenmp"],
        ),
        Extension(  # the native decode step over block-quantized weights (native/engine.py)
            "cscompile.native._csdec",
            sources=["cscompile/native/csrc/qdecode.c"],
            extra_compile_args=CFLAGS,
            extra_link_args=["-fopenmp"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
