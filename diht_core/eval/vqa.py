"""Zero-shot VQA as statement selection: pick the candidate statement closest to the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def vqa_accuracy(image_emb: torch.Tensor, statement_emb: torch.Tensor, labels: torch.Tensor,
                 qtypes: list[str] | None = None) -> dict:
    """accuracy, accuracy/<qtype> and chance (mean of 1/A).

    image_emb [N, d]; statement_emb [N, A, d] (question + answer rendered as a statement);
    labels [N] index of the correct statement. Candidate rows that are all-NaN are padding
    (questions with fewer than A answers): never chosen and not counted in chance.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    st = statement_emb.float()
    valid = ~torch.isnan(st).all(dim=-1)  # [N, A]
    st = F.normalize(torch.nan_to_num(st), dim=-1)
    sims = torch.einsum("nd,nad->na", img, st).masked_fill(~valid, float("-inf"))
    correct = (sims.argmax(dim=1) == torch.as_tensor(labels, device=sims.device).long()).float()
    out = {"accuracy": correct.mean().item(), "chance": (1.0 / valid.sum(dim=1).float()).mean().item()}
    if qtypes is not None:
        assert len(qtypes) == len(correct)
        for q in sorted(set(qtypes)):
            m = torch.tensor([t == q for t in qtypes], device=correct.device)
            out[f"accuracy/{q}"] = correct[m].mean().item()
    return out
