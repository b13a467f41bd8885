"""What a mask is and how it moves: which layers are sparse, per-layer densities, the update schedule,
the methods' drop and grow rules, N:M patterns, FLOPs and the plan. Import the modules directly."""
