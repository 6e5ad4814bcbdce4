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

extensions = [
    Extension(
        os.path.splitext(path)[0].replace(os.sep, "."),
        [path],
        extra_compile_args=["-O2"],
    )
    for path in sorted(glob.glob(os.path.join("pyrep", "_core", "*.pyx")))
]

setup(
    packages=["pyrep", "pyrep._core", "pyrep.drivers", "pyrep.tools", "pyrep.jobs"],
    package_dir={"pyrep": "pyrep", "pyrep.drivers": "drivers", "pyrep.tools": "tools"},
    package_data={"pyrep._core": ["*.pxd", "*.pyx"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    zip_safe=False,
)
