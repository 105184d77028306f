"""Triton kernels of blipfast, as the package ``blipfast.kernels``.

Their sources live in the repository's top-level ``kernels/`` folder, which is deliberately NOT an
importable top-level package (it has no ``__init__.py``): Hugging Face's ``kernels`` distribution, which
transformers >= 5.25 imports, is also called ``kernels``, and a run from the checkout (``python -m pytest``,
``python -m blipfast.cli``) puts the checkout on ``sys.path``, where a regular package of that name would
shadow the installed one. The build (setup.py's ``build_py``) copies ``kernels/*.py`` into this package for
wheels and sdist installs; in a checkout (editable install, or the checkout on ``sys.path``) this package's
search path is extended to the top-level folder instead, so both see the same modules.

Import lazily: importing this package must not require Triton; each kernel module imports triton itself and
is only loaded when its backend is selected.
"""
import os as _os

# The modules are here in an installed wheel; in a checkout they are only in <checkout>/kernels/.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CHECKOUT_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_HERE)), "kernels")
if (not _os.path.exists(_os.path.join(_HERE, "attention.py"))
        and _os.path.exists(_os.path.join(_CHECKOUT_KERNELS, "attention.py"))
        and _os.path.exists(_os.path.join(_CHECKOUT_KERNELS, "_constants.py"))):
    __path__.append(_CHECKOUT_KERNELS)  # noqa: F821  (a package's __path__)
