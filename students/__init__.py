"""Student and teacher architectures, the unified NoNN student model, and the export bundle."""
