"""Evaluation: win rate with intervals and length control, text metrics, training-time win rate."""
