"""Build kfac_fast: Python packages plus the compiled module `kfac_fast._C` via CMake.

Packages are found, not listed: every directory with an `__init__.py` under `kfac_fast/`
ships, and `kernels/` (with its subpackages) ships as `kfac_fast.kernels` (editable
installs included). tests/test_house.py fails when a package would be left out.
CUDA sources are compiled whenever nvcc is found; `KFAC_FAST_CUDA=0|1` overrides that
and `KFAC_FAST_CUDA_ARCHS` picks the architectures (default "80;90", plus PTX).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _packages() -> list[str]:
    """`kfac_fast` and its subpackages, plus `kernels/` and its subpackages renamed under
    `kfac_fast.kernels` (package_dir below maps the name back to the directory)."""
    own = find_packages(where=str(ROOT), include=["kfac_fast", "kfac_fast.*"])
    kernels = ["kfac_fast.kernels"] + [f"kfac_fast.kernels.{p}" for p in find_packages(where=str(ROOT / "kernels"))]
    return sorted(own + kernels)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


# Cache entries that name a program or directory: pip's isolated builds provide cmake,
# ninja and pybind11 from a temporary environment that is deleted afterwards, so the next
# build in the same tree would find build/temp.*/CMakeCache.txt pointing at a ninja that
# no longer exists ("Running '.../pip-build-env-.../bin/ninja' '--version' failed").
_CACHED_PATHS = ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND", "pybind11_DIR", "CMAKE_CUDA_COMPILER")


def drop_stale_cmake_cache(build_temp: Path, generator: str) -> bool:
    """Remove build_temp's CMakeCache.txt (and CMakeFiles/) when it was made with another
    generator or names a program or directory that no longer exists; True if it did.
    The object files stay: ninja or make rebuilds only what changed after the reconfigure."""
    cache = build_temp / "CMakeCache.txt"
    if not cache.is_file():
        return False
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[key.split(":", 1)[0]] = value
    stale = entries.get("CMAKE_GENERATOR", generator) != generator or any(
        entries.get(key) and not Path(entries[key]).exists() for key in _CACHED_PATHS)
    if stale:
        cache.unlink()
        shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)
    return stale


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        import pybind11

        want_cuda = os.environ.get("KFAC_FAST_CUDA")
        nvcc = _find_nvcc()
        if want_cuda == "1" and nvcc is None:
            raise RuntimeError("KFAC_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        use_cuda = nvcc is not None if want_cuda is None else want_cuda == "1"
        archs = os.environ.get("KFAC_FAST_CUDA_ARCHS", "80;90")

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('KFAC_FAST_BUILD_TYPE', 'Release')}",
            f"-DKFAC_FAST_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DKFAC_FAST_CUDA_ARCHS={archs}",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
        args += ["-G", generator]
        if drop_stale_cmake_cache(build_temp, generator):
            print(f"kfac_fast: dropped {build_temp / 'CMakeCache.txt'}: made by another build environment")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)],
                       cwd=build_temp, check=True)


setup(
    packages=_packages(),
    package_dir={"kfac_fast": "kfac_fast", "kfac_fast.kernels": "kernels"},
    # py.typed: the package's annotations are meant for type checkers (PEP 561).
    package_data={"kfac_fast": ["py.typed"]},
    ext_modules=[CMakeExtension("kfac_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
