"""Hand-crafted layer-level LR schedules; each module registers one controller."""
