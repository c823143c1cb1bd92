"""Pure-torch RLHF maths, CPU-testable and free of Ray and model code.

``kl`` holds the KL estimators and coefficient controllers, ``advantages`` the masked statistics,
token rewards, GAE and group baselines, ``ppo`` the policy and value losses and the token-mean
aggregation, ``preference`` the offline preference losses (DPO, IPO) and sequence log-probs,
``iql`` the token-level offline RL blocks (IQL's expectile and TD losses, CQL's penalty, AWR
weights, the token Q/V heads).
The learner imports the functions from those modules directly.
"""
