"""The learner: intake of comparisons, reward model, LoRA-PPO, adapter publishing."""
