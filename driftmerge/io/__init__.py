"""Files: checkpoints (read lazily, streamed with read-ahead), the adapter format, atomic output folders, run
folders, model skeletons. Builds on ``core`` and ``hub`` (a checkpoint may be a Hub id)."""
