"""The LSTM language model with the original token scheme.

Input sequence (length T + 2): ``[encode(code), START, w1 .. wT]`` with padding replaced by NULL; the image
step's output is never supervised. Targets: ``[-, w1 .. wn, END, ignored ...]``. Token ids: words 1..V,
START = END = V + 1, NULL = V + 2 (embedding rows are indexed by token id; row 0 is unused). Output classes
0..V: class ``k < V`` is word ``k + 1``, class ``V`` is END. The caption loss is summed over time and averaged
over regions (torch-rnn's ``TemporalCrossEntropyCriterion`` with ``time_average=false``).

``image_every_step`` (light configs; not the original) also appends the image encoding to every step's input.

Test-time decoding is greedy argmax for ``max_length`` steps (the original's default; its beam search was
"buggy" and unused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, input_dim: int, embed_dim: int, hidden_dim: int, max_length: int = 15,
                 image_every_step: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.image_every_step = image_every_step
        self.image_encoder = nn.Sequential(nn.Linear(input_dim, embed_dim), nn.ReLU())
        self.embedding = nn.Embedding(vocab_size + 3, embed_dim)
        self.lstm = nn.LSTM(embed_dim * (2 if image_every_step else 1), hidden_dim, batch_first=True)
        self.output = nn.Linear(hidden_dim, vocab_size + 1)
        with torch.no_grad():  # torch-rnn init: forget-gate bias 1 (PyTorch gate order i, f, g, o)
            h = hidden_dim
            self.lstm.bias_ih_l0.zero_()
            self.lstm.bias_hh_l0.zero_()
            self.lstm.bias_ih_l0[h:2 * h].fill_(1.0)

    @property
    def start_token(self) -> int:
        return self.vocab_size + 1

    @property
    def null_token(self) -> int:
        return self.vocab_size + 2

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """codes P x D, labels P x T (word ids, 0-padded) -> logits P x (T + 2) x (V + 1)."""
        p = labels.shape[0]
        tokens = labels.masked_fill(labels == 0, self.null_token)
        start = torch.full((p, 1), self.start_token, dtype=torch.long, device=labels.device)
        image = self.image_encoder(codes)[:, None]
        seq = torch.cat((image, self.embedding(torch.cat((start, tokens), 1))), 1)
        out, _ = self.lstm(self._inject(seq, image))
        return self.output(out)

    def _inject(self, steps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """With ``image_every_step``, append the image encoding to each step's input (P x S x E -> P x S x 2E)."""
        if not self.image_every_step:
            return steps
        return torch.cat((steps, image.expand(-1, steps.shape[1], -1)), 2)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p, t = labels.shape
        if p == 0:
            return logits.sum() * 0
        targets = torch.full((p, t + 2), -100, dtype=torch.long, device=labels.device)
        targets[:, 1:t + 1] = torch.where(labels > 0, labels - 1, torch.full_like(labels, -100))
        lengths = (labels > 0).sum(1)
        targets[torch.arange(p, device=labels.device), lengths + 1] = self.vocab_size  # END
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=-100, reduction="sum")
        return ce / p

    @torch.no_grad()
    def greedy_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes K x D -> word ids K x max_length (0 after the caption ends)."""
        k = codes.shape[0]
        tokens = torch.zeros((k, self.max_length), dtype=torch.long, device=codes.device)
        if k == 0:
            return tokens
        image = self.image_encoder(codes)[:, None]
        _, state = self.lstm(self._inject(image, image))
        x = self.embedding(torch.full((k, 1), self.start_token, dtype=torch.long, device=codes.device))
        alive = torch.ones(k, dtype=torch.bool, device=codes.device)
        for step in range(self.max_length):
            out, state = self.lstm(self._inject(x, image), state)
            cls = self.output(out[:, 0]).argmax(-1)
            ended = cls == self.vocab_size
            alive &= ~ended
            tokens[:, step] = torch.where(alive, cls + 1, torch.zeros_like(cls))
            if not alive.any():
                break
            x = self.embedding((cls + 1).clamp(max=self.vocab_size + 1))[:, None]
        return tokens
