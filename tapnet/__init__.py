"""tapnet: Docker's container networking as a packet-level userspace router."""

__version__ = "0.1.0"

import os as _os
import tempfile as _tempfile


def _choose_numba_cache_dir() -> None:
    """Send numba's cache somewhere writable when the package directory is not.

    numba writes its cache next to the module (`__pycache__`). After a root
    setup that directory belongs to root, and numba then raises instead of
    compiling in memory, so a normal user gets a cache of their own.
    """
    if "NUMBA_CACHE_DIR" in _os.environ:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    cache = _os.path.join(here, "__pycache__")
    if _os.access(cache if _os.path.isdir(cache) else here, _os.W_OK):
        return
    _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(_tempfile.gettempdir(), f"tapnet-numba-{_os.getuid()}")


_choose_numba_cache_dir()
