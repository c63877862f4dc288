"""The stages' Prefect tasks by name, in pipeline order."""

from tasks import STAGES
from tasks.benchmark import benchmark
from tasks.cat_filter import cat_filter
from tasks.concepts import concepts
from tasks.download import download
from tasks.fewshot import fewshot
from tasks.pseudo_labels import pseudo_labels
from tasks.recaption import recaption
from tasks.teacher import teacher
from tasks.train import train_task

TASKS = {"download": download, "cat_filter": cat_filter, "recaption": recaption, "concepts": concepts, "teacher": teacher,
         "pseudo_labels": pseudo_labels, "train": train_task, "benchmark": benchmark, "fewshot": fewshot}
assert tuple(TASKS) == STAGES
