"""Sentence embeddings, for the agreement of a model's generations with human reference answers.

    emb = SentenceEmbedder("builtin:minilm-l6")
    u = emb.embed(["a generated answer", ...])      # [n, d], unit rows

The all-MiniLM-L6-v2 recipe (Reimers & Gurevych 2019, Sentence-BERT; the sentence-transformers
model card): token states h_t of the encoder's last layer, mean-pooled over the real tokens only,

    e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)      (m = attention mask, 0 on padding)

then L2-normalised, û = e / ‖e‖₂, so the cosine similarity of two texts is the dot product û·v̂.
Any backbone `raylign.models.load_backbone` can load works (a `tiny:` model for tests), but only a
sentence encoder trained for it (MiniLM) gives similarities that mean something.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_EMBEDDER = "builtin:minilm-l6"


class SentenceEmbedder:
    """A frozen encoder that maps texts to unit vectors (mean pooling with the attention mask)."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, batch_size: int = 32, max_length: int = 256,
                 device: str | None = None):
        import torch

        from raylign.models import load_backbone

        net, self.tokenizer = load_backbone(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = net.to(self.device).eval().requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # real tokens keep positions 0..L-1 in any architecture
        self.batch_size = batch_size
        self.max_length = max_length  # all-MiniLM-L6-v2 truncates at 256 word pieces
        self.name = model

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray:
        """[len(texts), hidden] float64 unit vectors (module docstring); texts are embedded longest
        first so batches pad little, and returned in input order."""
        import torch
        from tqdm.auto import tqdm

        texts = [str(t) for t in texts]
        out: np.ndarray | None = None
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.no_grad(), tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                pooled = mean_pool(hidden, mask)
                unit = torch.nn.functional.normalize(pooled, p=2, dim=1).double().cpu().numpy()
                if out is None:
                    out = np.zeros((len(texts), unit.shape[1]), dtype=np.float64)
                out[idx] = unit
                bar.update(len(idx))
        if out is None:
            hidden_size = int(getattr(self.model.config, "hidden_size", 0))
            return np.zeros((0, hidden_size), dtype=np.float64)
        return out


def mean_pool(hidden, mask):
    """Σ_t m_t h_t / max(Σ_t m_t, 1e-9) over the sequence axis: [B, T, H], [B, T] -> [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
