"""Imports limited to what the GPU machine has: put this folder first on PYTHONPATH and every Python
process started with that environment (the kit's subprocesses too) can import only

  - the standard library (sys.stdlib_module_names, and what lies in the interpreter's own library
    folders, such as _sysconfigdata_*);
  - the GPU machine's own packages (/work/shared/gpu-wheels/README.md, BENCHMARKS.md: Python 3.12, torch
    2.11, numpy, tiktoken, safetensors, transformers, pyarrow, pyyaml, fsspec, einops, msgpack, ninja,
    py-cpuinfo, nvidia-ml-py, psutil, triton, pytest) and what they themselves require to install (torch's
    sympy, networkx, jinja2, filelock; transformers' huggingface_hub, tokenizers, regex, requests, tqdm,
    packaging; pytest's pluggy, iniconfig, pygments);
  - the wheels carried to it (shared/gpu-wheels: deepspeed, pydantic, pydantic_core, annotated_types,
    typing_inspection, typing_extensions, hjson, liger_kernel);
  - our packages (pipeline, tokenization, train, eval), which must therefore import nothing else at
    import time.

Anything else installed here (ray, mlflow, ...) is not found, as there: an import of it raises
ModuleNotFoundError (code that imports it unconditionally fails, code that treats it as optional
carries on) and importlib.util.find_spec returns None. Each refusal is also written to stderr as
`gpu-machine imports: refused NAME`, so a test can see what was asked for.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from importlib.machinery import BuiltinImporter, FrozenImporter, PathFinder

ALLOWED = frozenset({
    # the GPU machine's packages (import names)
    "torch", "torchgen", "functorch", "numpy", "tiktoken", "tiktoken_ext", "safetensors", "transformers",
    "pyarrow", "yaml", "_yaml", "fsspec", "einops", "msgpack", "ninja", "cpuinfo", "pynvml", "psutil", "triton",
    "pytest", "_pytest", "py",
    # what those require (their install requirements; torch needs setuptools on Python 3.12)
    "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "setuptools", "pkg_resources",
    "_distutils_hack", "huggingface_hub", "tokenizers", "regex", "requests", "urllib3", "idna", "certifi",
    "charset_normalizer", "tqdm", "packaging", "hf_xet", "pluggy", "iniconfig", "pygments",
    # the wheels of shared/gpu-wheels
    "deepspeed", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
    "hjson", "liger_kernel",
    # ours
    "pipeline", "tokenization", "train", "eval", "sitecustomize",
})


# the interpreter's own library folders (not site-packages): what is found there is the standard library
_STDLIB_DIRS = tuple(os.path.realpath(d) + os.sep for d in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")})
_SITE = f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}"


def allowed(top: str, spec) -> bool:
    if top in ALLOWED or top in sys.stdlib_module_names:
        return True
    where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations or []), "") or "")
    for site in _SITE:  # a copy vendored inside an allowed package (setuptools/_vendor/jaraco) comes with it
        if site in where:
            return where.split(site, 1)[1].split(os.sep, 1)[0] in ALLOWED
    return where.startswith(_STDLIB_DIRS)  # a private module of the standard library, e.g. _sysconfigdata_*


class Absent:
    """Wraps one finder of sys.meta_path: a module it finds that is not allowed is not found. So an import
    of it raises ModuleNotFoundError and importlib.util.find_spec returns None, as on the GPU machine."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        spec = self.inner.find_spec(name, path, target)
        top = name.partition(".")[0]
        if spec is None or allowed(top, spec):
            return spec
        if path is None and self.inner is PathFinder:  # an allowed package's vendored copy, further down sys.path
            vendored = [p for p in sys.path if any(site in p and p.split(site, 1)[1].split(os.sep, 1)[0] in ALLOWED
                                                   for site in _SITE)]
            spec = PathFinder.find_spec(name, vendored)
            if spec is not None and allowed(top, spec):
                return spec
        sys.stderr.write(f"gpu-machine imports: refused {name} (installed here, not on the GPU machine)\n")
        return None

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [f if f in (BuiltinImporter, FrozenImporter) else Absent(f) for f in sys.meta_path]
