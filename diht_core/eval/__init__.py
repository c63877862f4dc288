"""Evaluation: metrics on embeddings, the task registry, encoders, the runner, reports and few-shot."""
