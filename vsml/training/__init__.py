"""Training machinery: the loop, checkpoints, loggers, torch.distributed, presets, the config CLI."""
