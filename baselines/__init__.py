"""Hand-crafted per-layer LR curves; each module registers one controller."""
