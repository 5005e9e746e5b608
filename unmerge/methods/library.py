"""Imports every method module so that the registry is complete. Add a new module here."""
from unmerge.methods import arithmetic  # noqa: F401
from unmerge.methods import removal  # noqa: F401
from unmerge.methods import fisher  # noqa: F401
from unmerge.methods import interpolation  # noqa: F401
from unmerge.methods import sparsify  # noqa: F401
from unmerge.methods import regmean  # noqa: F401
from unmerge.methods import mats  # noqa: F401
