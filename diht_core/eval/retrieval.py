"""Image-text retrieval recall@k (CLIP_benchmark keys), memory bounded; one gallery or separate block galleries."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def _ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor, chunk_size: int):
    """0-based rank of the best positive per query: number of items scoring strictly higher.

    Returns (text_ranks [n_texts], image_ranks [n_images]); an image with no caption never hits.
    Scores are always computed as text @ image.T slices, so both directions see the same numbers.
    """
    n_img, n_txt = len(image_emb), len(text_emb)
    # text -> image: each caption ranks the images
    text_ranks = torch.empty(n_txt, dtype=torch.long, device=text_emb.device)
    for s in range(0, n_txt, chunk_size):
        sc = text_emb[s:s + chunk_size] @ image_emb.T  # [c, n_img]
        pos = sc.gather(1, t2i[s:s + chunk_size, None])
        text_ranks[s:s + chunk_size] = (sc > pos).sum(dim=1)
    # image -> text: each image ranks the captions, hit if any of its captions is high enough
    image_ranks = torch.full((n_img,), torch.iinfo(torch.long).max, dtype=torch.long, device=text_emb.device)
    for s in range(0, n_img, chunk_size):
        img = torch.arange(s, min(s + chunk_size, n_img), device=text_emb.device)
        sc = (text_emb @ image_emb[img].T).T  # [c, n_txt]
        pos = t2i[None, :] == img[:, None]
        best = sc.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
        has = pos.any(dim=1)
        image_ranks[img[has]] = (sc[has] > best[has]).sum(dim=1)
    return text_ranks, image_ranks


def _metrics(text_ranks, image_ranks, ks) -> dict:
    m = {}
    for k in ks:
        m[f"image_retrieval_recall@{k}"] = (text_ranks < k).float().mean().item()
        m[f"text_retrieval_recall@{k}"] = (image_ranks < k).float().mean().item()
    m["mean_recall@1"] = 0.5 * ((text_ranks < 1).float().mean().item() + (image_ranks < 1).float().mean().item())
    return m


def _prepare(image_emb, text_emb, text_to_image):
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    assert len(t2i) == len(text_emb) and (len(t2i) == 0 or 0 <= int(t2i.min()) and int(t2i.max()) < len(image_emb))
    return image_emb, text_emb, t2i


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, ks=(1, 5, 10),
                      chunk_size: int = 1024) -> dict:
    """Recall@k both ways plus mean_recall@1 (DataComp), one gallery.

    image_retrieval_recall@k: a caption is a hit if its image is in its top-k images.
    text_retrieval_recall@k: an image is a hit if any of its captions is in its top-k captions
    (an image without captions counts as a miss, as in CLIP_benchmark).
    """
    image_emb, text_emb, t2i = _prepare(image_emb, text_emb, text_to_image)
    return _metrics(*_ranks(image_emb, text_emb, t2i, chunk_size), ks)


@torch.no_grad()
def block_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, blocks: list[dict],
                            ks=(1, 5, 10), chunk_size: int = 1024) -> dict:
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
