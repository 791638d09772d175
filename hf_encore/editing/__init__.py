"""The editing algorithm as small steps (docs/algorithm.md); ``pipeline.edit_batch`` runs them in order."""
