"""A run's facts for people: one normalised view of a run (data.py), its PNG (png.py) and the
accuracy/cost Pareto frontier of a sweep (pareto.py)."""
