"""NoNN distillation pipeline: data, Lightning modules, losses, stages, command line and tracking."""
