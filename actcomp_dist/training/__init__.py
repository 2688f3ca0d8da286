"""Pretraining system: run config, DeepSpeed engine, activation checkpointing, checkpoints,
metrics and the training loop. Imports DeepSpeed and megatron-core lazily."""
