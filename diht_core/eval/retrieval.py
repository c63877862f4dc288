"""Image-text retrieval recall@k (CLIP_benchmark keys), memory bounded; one gallery or separate block galleries."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def _ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor, chunk_size: int):
    """0-based rank of the best positive per query: number of items scoring strictly higher.

    Returns (text_ranks [n_texts], image_ranks [n_images]); an image with no caption never hits.
    Scores are always computed as text @ image.T slices, and each query's positive is read from the very slice it
    is compared with, so a pair never outranks itself by a rounding difference. Peak memory: one score slice of
    chunk_size x gallery and its comparison, never a gallery x gallery matrix.
    """
    n_img, n_txt = len(image_emb), len(text_emb)
    dev = text_emb.device
    # text -> image: each caption ranks the images
    text_ranks = torch.empty(n_txt, dtype=torch.long, device=dev)
    for s in range(0, n_txt, chunk_size):
        sc = text_emb[s:s + chunk_size] @ image_emb.T  # [c, n_img]
        pos = sc.gather(1, t2i[s:s + chunk_size, None])
        text_ranks[s:s + chunk_size] = (sc > pos).sum(dim=1)
    # image -> text: each image ranks the captions, hit if any of its captions is high enough
    image_ranks = torch.full((n_img,), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)
    order = torch.argsort(t2i, stable=True)  # captions grouped by image: a chunk's positives are one slice of it
    bounds = torch.searchsorted(t2i[order], torch.arange(0, n_img + chunk_size, chunk_size, device=dev).clamp(max=n_img))
    for b, s in enumerate(range(0, n_img, chunk_size)):
        e = min(s + chunk_size, n_img)
        sc = text_emb @ image_emb[s:e].T  # [n_txt, c]
        texts = order[bounds[b]:bounds[b + 1]]  # the captions of images s..e-1
        best = torch.full((e - s,), float("-inf"), device=dev).scatter_reduce(
            0, t2i[texts] - s, sc[texts, t2i[texts] - s], reduce="amax")
        has = torch.isfinite(best)
        ranks = (sc > best).sum(dim=0)
        image_ranks[s:e] = torch.where(has, ranks, image_ranks[s:e])
    return text_ranks, image_ranks


def _metrics(text_ranks, image_ranks, ks) -> dict:
    m = {}
    for k in ks:
        m[f"image_retrieval_recall@{k}"] = (text_ranks < k).float().mean().item()
        m[f"text_retrieval_recall@{k}"] = (image_ranks < k).float().mean().item()
    m["mean_recall@1"] = 0.5 * ((text_ranks < 1).float().mean().item() + (image_ranks < 1).float().mean().item())
    return m


def _unit(emb: torch.Tensor) -> torch.Tensor:
    """emb as float rows of unit norm: itself when it already is one (no copy of a large gallery), else a copy."""
    if emb.dtype == torch.float32 and (len(emb) == 0 or bool(((emb.norm(dim=-1) - 1).abs() < 1e-6).all())):
        return emb
    return F.normalize(emb.float(), dim=-1)


def _prepare(image_emb, text_emb, text_to_image):
    image_emb, text_emb = _unit(image_emb), _unit(text_emb)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    assert len(t2i) == len(text_emb) and (len(t2i) == 0 or 0 <= int(t2i.min()) and int(t2i.max()) < len(image_emb))
    return image_emb, text_emb, t2i


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, ks=(1, 5, 10),
                      chunk_size: int = 256) -> dict:
    """Recall@k both ways plus mean_recall@1 (DataComp), one gallery.

    image_retrieval_recall@k: a caption is a hit if its image is in its top-k images.
    text_retrieval_recall@k: an image is a hit if any of its captions is in its top-k captions
    (an image without captions counts as a miss, as in CLIP_benchmark).
    """
    image_emb, text_emb, t2i = _prepare(image_emb, text_emb, text_to_image)
    return _metrics(*_ranks(image_emb, text_emb, t2i, chunk_size), ks)


@torch.no_grad()
def block_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, blocks: list[dict],
                            ks=(1, 5, 10), chunk_size: int = 256) -> dict:
    """Retrieval in separate galleries (the Conceptual Captions protocol): each block {"images": (start, end),
    "full": bool, counts...} holds the images [start, end) and the captions of those images.

    Returns the mean over the *full* blocks under retrieval_metrics' keys (NaN without a full block), "full_blocks"
    and "partial_blocks" (counts) and "blocks": {"<b>": the block's counts, "full", "images" (its gallery size) and
    its own metrics (none for a block without an image)}. A partial block is reported there, never averaged.
    """
    image_emb, text_emb, t2i = _prepare(image_emb, text_emb, text_to_image)
    per_block, full = {}, []
    for i, block in enumerate(blocks):
        s, e = block["images"]
        entry = {k: v for k, v in block.items() if k not in ("images", "block")}
        entry["images"] = e - s
        if e > s:
            sel = (t2i >= s) & (t2i < e)
            entry.update(_metrics(*_ranks(image_emb[s:e], text_emb[sel], t2i[sel] - s, chunk_size), ks))
            if block["full"]:
                full.append(entry)
        per_block[str(block.get("block", i))] = entry
    keys = [f"{d}_retrieval_recall@{k}" for k in ks for d in ("image", "text")] + ["mean_recall@1"]
    out = {key: sum(b[key] for b in full) / len(full) if full else float("nan") for key in keys}
    out.update(full_blocks=len(full), partial_blocks=len(blocks) - len(full), blocks=per_block)
    return out
