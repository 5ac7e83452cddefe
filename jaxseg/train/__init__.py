"""Training: state and freezing, pre-training and fine-tuning steps, the loop, checkpoints, sharding."""
