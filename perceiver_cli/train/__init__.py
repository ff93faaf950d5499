"""Training pipeline: prepare token shards, train (single process or torchrun DDP), evaluate held-out bits."""
