"""Self-improvement data loops: stages that make a model's next training data (pairs, curriculum, augment)."""
