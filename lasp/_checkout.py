"""``lasp.kernels`` from a plain checkout.

setup.py installs the top-level folder ``kernels/`` as the subpackage ``lasp.kernels`` (the
top-level name ``kernels`` belongs to another PyPI package). An install, wheel or editable, maps
it; a checkout put on ``PYTHONPATH`` (a bare GPU machine, a cluster node that runs the code from a
shared checkout) has no folder ``lasp/kernels``, so ``import lasp.kernels`` failed there.
:func:`map_checkout_kernels` appends a finder for that one name to ``sys.meta_path`` when lasp is
imported from a checkout (``setup.py`` and ``kernels/__init__.py`` beside the ``lasp`` folder);
being last, it answers only when nothing else found ``lasp.kernels`` (an installed copy wins).
"""
from __future__ import annotations

import importlib.util
import os
import sys


class CheckoutKernelsFinder:
    """A meta path finder that maps ``lasp.kernels`` to a checkout's ``kernels/`` folder (its
    submodules are then found through the package's ``__path__``)."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "lasp.kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


def map_checkout_kernels(package_dir: str) -> None:
    """Install the finder when ``package_dir`` (the ``lasp`` folder) sits in a checkout."""
    root = os.path.dirname(os.path.abspath(package_dir))
    folder = os.path.join(root, "kernels")
    in_checkout = os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(folder, "__init__.py"))
    if not in_checkout or os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    if not any(isinstance(f, CheckoutKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(CheckoutKernelsFinder(folder))
