"""One Prefect task per stage. Each reads files, writes files, logs to MLflow, and is a CLI:
``python -m tasks.<stage> --params params.yaml``."""

STAGES = ("download", "cat_filter", "recaption", "concepts", "teacher", "pseudo_labels", "train", "benchmark", "fewshot")

# what a stage reads under paths.data -> the stage that writes it (a missing input names the stage to run first)
INPUTS = {
    "cat_filter": {"raw/train": "download"},
    "concepts": {"cat/decisions.parquet": "cat_filter"},
    "teacher": {"raw/teacher": "download", "eval/synthetic_shape": "download", "filtered": "cat_filter",
                "cat/decisions.parquet": "cat_filter", "concepts/vocab.json": "concepts"},
    "pseudo_labels": {"teacher/classifiers.pt": "teacher", "teacher/features": "teacher",
                      "cat/decisions.parquet": "cat_filter"},
    "train": {"pseudo_labels/vocab_sizes.json": "pseudo_labels"},
}
