"""How a job runs: the Trainer and its step loop, devices and DDP, optimizers and LR schedules,
precision and kernel settings, paper recipes, warm starts and the local run into a folder."""
