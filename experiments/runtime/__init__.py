"""Runtime: device mesh and placement, checkpoints, workdir lock, gin set-up."""
