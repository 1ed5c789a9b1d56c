"""Object stores behind one small contract (see base.py)."""

from .base import Store, check_key  # noqa: F401
