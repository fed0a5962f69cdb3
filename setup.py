"""Build script: the Python package plus the optional C++/CUDA extension ``epban._C``.

The extension is compiled from ``csrc/`` with ``torch.utils.cpp_extension`` (ninja):
- CUDA sources (``*.cu``) are added when torch is a CUDA build and nvcc is found;
  CUDA_HOME defaults to /usr/local/cuda when unset and present (the ``nvcc`` on some
  PATHs is a wrapper script from which torch would guess the wrong home).
- ``EPBAN_BUILD_EXT=0`` skips the extension; ``import epban`` then serves every op
  from its PyTorch reference path. ``EPBAN_BUILD_CUDA=0`` builds it for the CPU only. Both
  are read through ``epban/settings.py`` (loaded by path: it needs only the standard library).
- With no GPU visible, the CUDA architectures default to ``DEFAULT_CUDA_ARCHS``
  (one real target plus PTX keeps CI's compile short); ``TORCH_CUDA_ARCH_LIST``
  overrides it.
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _settings():
    """epban/settings.py, loaded by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("_epban_settings", os.path.join(ROOT, "epban", "settings.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _packages():
    return find_packages(include=["epban", "epban.*"]) + ["epban.kernels"]


def _find_nvcc():
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None and bool(home)


def _extension():
    settings = _settings()
    if not settings.build_extension():
        print("epban: EPBAN_BUILD_EXT=0, skipping the C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp_sources:
        return [], {}
    with_cuda = settings.build_cuda() and torch.version.cuda is not None and bool(cu_sources) and _find_nvcc()
    openmp = ["-fopenmp"]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 on torch 2.14).
    extra_compile_args = {
        "cxx": ["-O3", *openmp],
    }
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        define_macros.append(("WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        sources = cpp_sources + cu_sources
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpp_sources
    print(f"epban: building epban._C ({'CPU+CUDA' if with_cuda else 'CPU'}) from {len(sources)} sources")
    ext = ext_cls(
        name="epban._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=openmp,
        py_limited_api=False,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extension()

setup(
    packages=_packages(),
    package_dir={"epban.kernels": "kernels"},
    package_data={"epban": ["weights/*/*.json", "weights/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
