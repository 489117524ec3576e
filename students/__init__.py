"""Architectures (teacher and students), the unified NoNN student, the side-by-side and layer-wise
splits, and their size and compute."""
