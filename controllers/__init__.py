"""Adaptive and learned layer-level LR controllers; each module registers one controller."""
