"""Training: objective, optimizers and schedules, the jitted train step."""
