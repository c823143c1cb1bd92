"""Scoring: reward functions and reward models, and the RewardScorer actor class."""
