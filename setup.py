"""Build hook: ``pip install .`` / ``pip install -e .`` also builds the custom-op library (kernels/build.py).

The project metadata lives in pyproject.toml. The library is not a Python extension; it is declared as
one so that setuptools runs this step, marks the wheel as platform-specific and, for editable installs,
leaves the library in ``kernels/``. When it cannot be built (no ONNX Runtime headers and no way to fetch
them, no compiler) the install still succeeds, says so, and using the op raises an error that names
``python kernels/build.py``. ``LOWBIT_BUILD_KERNELS=0`` skips the step.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIBRARY_MODULE = "lowbit.kernels.liblowbit_ops"


def _kernel_build():
    spec = importlib.util.spec_from_file_location("lowbit_kernel_build", ROOT / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildOpLibrary(build_ext):
    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")) + ".so"  # liblowbit_ops.so, no Python ABI tag

    def build_extension(self, ext):
        if os.environ.get("LOWBIT_BUILD_KERNELS", "1") == "0":
            self._not_built("LOWBIT_BUILD_KERNELS=0")
            return
        build = _kernel_build()
        try:
            library = build.build(log=lambda message: print(message, file=sys.stderr))
        except build.BuildError as error:
            self._not_built(str(error))
            return
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.resolve() != library.resolve():
            shutil.copy2(library, target)

    def copy_extensions_to_source(self):
        # editable installs: build() already wrote kernels/liblowbit_ops.so, or nothing was built
        pass

    @staticmethod
    def _not_built(reason):
        banner = "=" * 78
        print(
            f"{banner}\nlowbit: custom-op kernels NOT built: {reason}\n"
            f"lowbit installs without them; fused lowbit:: ops will raise until you run `python kernels/build.py`"
            f"\n{banner}",
            file=sys.stderr,
        )


setup(ext_modules=[Extension(LIBRARY_MODULE, sources=[])], cmdclass={"build_ext": BuildOpLibrary})
