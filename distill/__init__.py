"""The distillation itself: losses, the Lightning training modules, the teacher-output pool, precision,
checkpoint reading and experiment tracking. Knows nothing of run folders, configs files or the CLI."""
