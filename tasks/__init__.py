"""One Prefect task per stage. Each reads files, writes files, logs to MLflow, and is a CLI:
``python -m tasks.<stage> --params params.yaml``."""

STAGES = ("download", "cat_filter", "concepts", "teacher", "pseudo_labels", "train", "benchmark", "fewshot")
