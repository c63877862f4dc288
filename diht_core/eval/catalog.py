"""The benchmark's tasks as plain data, the one list of them: DiHT's 17 + 10 + 2 tasks, the extra cc_val and the 6
synthetic ones."""

# registry.py turns each row below into a TaskSpec (attaching its loader). The paper names only ImageNet-1K, COCO and
# Flickr30K; the rest is a reconstruction, see docs/benchmark_tasks.md.

# name, CLIP_benchmark wds folder (HF clip-benchmark/wds_<folder>), main metric, notes
CLASSIFICATION = [
    ("imagenet1k", "imagenet1k", "acc1", "ImageNet-1K validation (50k); named in the paper"),
    ("imagenetv2", "imagenetv2", "acc1", "ImageNet-V2 matched-frequency"),
    ("imagenet-r", "imagenet-r", "acc1", "ImageNet-Rendition, 200 classes"),
    ("imagenet-a", "imagenet-a", "acc1", "ImageNet-Adversarial, 200 classes"),
    ("imagenet_sketch", "imagenet_sketch", "acc1", "ImageNet-Sketch"),
    ("objectnet", "objectnet", "acc1", "ObjectNet, 113 classes overlapping ImageNet"),
    ("cifar10", "cifar10", "acc1", "CIFAR-10 test"),
    ("cifar100", "cifar100", "acc1", "CIFAR-100 test"),
    ("mnist", "mnist", "acc1", "MNIST test"),
    ("food101", "food101", "acc1", "Food-101 test"),
    ("sun397", "sun397", "acc1", "SUN397 (CLIP_benchmark split)"),
    ("cars", "cars", "acc1", "Stanford Cars test"),
    ("fgvc_aircraft", "fgvc_aircraft", "mean_per_class_recall", "FGVC Aircraft (variant level) test"),
    ("dtd", "dtd", "acc1", "Describable Textures test"),
    ("pets", "vtab-pets", "mean_per_class_recall", "Oxford-IIIT Pets (CLIP_benchmark vtab/pets)"),
    ("caltech101", "vtab-caltech101", "mean_per_class_recall", "Caltech-101 (CLIP_benchmark vtab/caltech101)"),
    ("flowers102", "vtab-flowers", "mean_per_class_recall", "Oxford Flowers-102 (CLIP_benchmark vtab/flowers)"),
]

# stem (tasks <stem>_t2i and <stem>_i2t), layout (karpathy | wds), data path under data_root, notes.
# DiHT's 10 retrieval tasks: COCO and Flickr30K (both directions) are named in the paper; the other three
# datasets are guesses (docs/benchmark_tasks.md).
RETRIEVAL = [
    ("coco", "karpathy", "coco/coco_test.json",
     "COCO 5k Karpathy test, as DiHT's example_retrieval_eval.py; named in the paper"),
    ("flickr30k", "karpathy", "flickr30k/flickr30k_test.json",
     "Flickr30K 1k Karpathy test, as DiHT's example_retrieval_eval.py; named in the paper"),
    ("flickr8k", "wds", "wds/flickr8k",
     "Flickr8k 1k Karpathy test (CLIP_benchmark's third retrieval set); guessed"),
    ("xm3600", "wds", "wds/crossmodal3600",
     "Crossmodal-3600, English captions (clip_benchmark_export_wds --dataset crossmodal3600 --retrieval); guessed"),
    ("nocaps", "wds", "wds/nocaps",
     "nocaps validation (4,500 Open Images photos, 10 captions each) in the W-ret layout; guessed"),
]

# Retrieval tasks outside DiHT's 29: stem, layout (cc), data folder under data_root, notes.
EXTRA_RETRIEVAL = [
    ("cc_val", "cc", "cc",
     "Conceptual Captions validation as diht-gcc-evaluation-report.md evaluates it: the first 14,000 rows in "
     "7 blocks of 2,000 rows, each its own gallery, mean over the full blocks; dead URLs counted per block; "
     "not in the DiHT paper"),
]
CC_ROWS, CC_BLOCK_SIZE = 14_000, 2_000  # the GCC study: validation rows 0..13,999, blocks of 2,000 rows

DIRECTIONS = (("t2i", "image_retrieval_recall@1", "text-to-image"),   # a caption finds its image
              ("i2t", "text_retrieval_recall@1", "image-to-text"))    # an image finds one of its captions

# name, notes
VQA = [
    ("vqav2", "VQAv2 val as zero-shot answer selection (candidate answers per question); reconstruction"),
    ("gqa", "GQA testdev-balanced as zero-shot answer selection; reconstruction"),
]

# name, kind, main metric: written by the download stage under <data>/eval/<name>/
SYNTHETIC = [
    ("synthetic_shape", "classification", "acc1"),
    ("synthetic_colour", "classification", "acc1"),
    ("synthetic_count", "classification", "acc1"),
    ("synthetic_retrieval", "retrieval", "mean_recall@1"),
    ("synthetic_vqa", "vqa", "accuracy"),
    ("synthetic_compositional", "vqa", "accuracy"),  # true caption vs the same words swapped (ARO / Winoground)
]


def task_names() -> list[str]:
    """Every task, in registration order; config.py checks ``benchmark.tasks`` against it."""
    return ([row[0] for row in CLASSIFICATION]
            + [f"{row[0]}_{d[0]}" for row in RETRIEVAL + EXTRA_RETRIEVAL for d in DIRECTIONS]
            + [row[0] for row in VQA] + [row[0] for row in SYNTHETIC])
