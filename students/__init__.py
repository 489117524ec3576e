"""Architectures (teacher and students), the unified NoNN student, the side-by-side and layer-wise
splits, and their size and compute."""

from students import networks  # noqa: E402,F401 - its architectures register themselves on import
