"""Checkpoint formats: one module per format (see spec.Format), listed in table.FORMATS."""
