"""Training: the shared loop, checkpoints, and one module per method (SFT, DPO, reward model)."""
