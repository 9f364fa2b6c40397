"""The one C extension (the target's gathered-write run, ``node_agent/iscsi/_fastpath.c``).

Everything else about the package is in ``pyproject.toml``.  ``optional=True``: a machine without a C
compiler or Python's headers still installs Shoal, and ``connection.py`` runs the same checks in Python
(``make deps`` installs ``gcc`` and ``python3-dev`` so that ``make test`` builds and tests it).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("node_agent.iscsi._fastpath", ["node_agent/iscsi/_fastpath.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
                             optional=True)])
