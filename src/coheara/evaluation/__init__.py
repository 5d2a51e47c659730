"""Evaluation: gold sets, task-quality and compliance metrics, runs, reports and the gate."""
