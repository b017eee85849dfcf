"""Parallelism applied to the model from outside (DESIGN.md §1): pipeline/ (schedules, simulator,
executor); mesh, expert parallel and data parallel live beside it."""
