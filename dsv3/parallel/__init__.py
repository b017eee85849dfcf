"""Parallel plans, applied to the model from outside: process groups, data/expert/pipeline parallelism."""
