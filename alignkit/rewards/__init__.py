"""Rewards: one interface (score prompt/response pairs), backends, verifiers, cache, server."""

from .backends import CachedReward, HFRewardModel, RemoteReward, RewardBackend, RewardConfig, RuleReward, build_backend

__all__ = ["CachedReward", "HFRewardModel", "RemoteReward", "RewardBackend", "RewardConfig", "RuleReward", "build_backend"]
