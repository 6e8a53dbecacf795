"""Training on Ray Train: the per-worker loop (``loop``), the methods (``methods``), the run around
them (``trainer``), and the probes and fine-tuning that score a checkpoint."""
