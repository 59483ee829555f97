"""The training engine: the pretraining and fine-tuning loops and what they share (state, checkpoints,
batching, optimiser, schedules, run time, processes)."""
