"""Training: the engine — train units (unit.py), the stage interface (stage.py), the loop (trainer.py) and its
components (restore, evaluation, signals, memory), the optimizer, learning-rate schedules and metrics."""
