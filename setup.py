"""Build script: the Cython core (pyrep/_core/*.pyx) is compiled here.

The built-in drivers live in drivers/ and the tools in tools/; they are
installed as the subpackages pyrep.drivers and pyrep.tools.
"""
import glob
import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - pyproject's build requirements provide it
    raise SystemExit("pyrep needs Cython to build: pip install cython")

def _module_name(path):
    """pyrep/_core/x.pyx -> pyrep._core.x; drivers/qcow2/x.pyx -> pyrep.drivers.qcow2.x"""
    parts = os.path.splitext(path)[0].split(os.sep)
    if parts[0] == "drivers":
        parts = ["pyrep"] + parts
    return ".".join(parts)


sources = sorted(glob.glob(os.path.join("pyrep", "_core", "*.pyx")) +
                 glob.glob(os.path.join("pyrep", "nbd", "*.pyx")) +
                 glob.glob(os.path.join("drivers", "**", "*.pyx"), recursive=True))
extensions = [Extension(_module_name(path), [path], extra_compile_args=["-O2"]) for path in sources]

setup(
    packages=["pyrep", "pyrep._core", "pyrep.drivers", "pyrep.drivers.qcow2", "pyrep.tools", "pyrep.tools.img",
              "pyrep.tools.io", "pyrep.jobs", "pyrep.nbd", "pyrep.qmp", "pyrep.qmp.commands"],
    package_dir={"pyrep": "pyrep", "pyrep.drivers": "drivers", "pyrep.tools": "tools"},
    package_data={"pyrep._core": ["*.pxd", "*.pyx"], "pyrep.nbd": ["*.pxd", "*.pyx"], "pyrep.drivers.qcow2": ["*.pxd", "*.pyx"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    zip_safe=False,
)
