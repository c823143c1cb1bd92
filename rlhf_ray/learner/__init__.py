"""The learner: PPO on one batch (`PPOTrainer`) and the Learner actor class around it."""
