"""Checkpoints as global tensors (manifest + shard files + commit marker); see issue 6."""
