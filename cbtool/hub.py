"""Deprecated: moved to :mod:`cbtool.models.hub` in cbtool 0.2.0; this import path is kept for one release.

Importing it gives the module at its new path itself (the same object), so every name, private ones too, and any
patch applied through either path are shared.
"""

import sys

from cbtool.models import hub as _moved

sys.modules[__name__] = _moved
