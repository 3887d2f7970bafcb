"""The LSTM language model with the original token scheme.

Input sequence (length T + 2): ``[encode(code), START, w1 .. wT]`` with padding replaced by NULL; the image
step's output is never supervised. Targets: ``[-, w1 .. wn, END, ignored ...]``. Token ids: words 1..V,
START = END = V + 1, NULL = V + 2 (embedding rows are indexed by token id; row 0 is unused). Output classes
0..V: class ``k < V`` is word ``k + 1``, class ``V`` is END. The caption loss is summed over time and averaged
over regions (torch-rnn's ``TemporalCrossEntropyCriterion`` with ``time_average=false``).

``image_every_step`` (light configs; not the original) also appends the image encoding to every step's input.

``grid_channels > 0`` (``lm_grid_attention``; not the original) adds soft attention over the region's RoI grid
(the 7 x 7 cells fc6 reads), after the LSTM as in Luong et al. 2015: each cell is projected to ``embed_dim`` and
given a learned embedding of its place in the grid; at every step the LSTM's output asks (scaled dot product)
which cells to read, and the word is predicted from ``tanh(W [h; attended])``. The region code squeezes a union
box's two objects into one vector; with attention the first object's words can read one side of the box and the
second's the other (docs/model.md). The read does not feed back into the recurrence (the words said do), so the
LSTM still runs over the whole sequence at once in training: 1.3x the language model's training pass on 2 CPU
cores (``scripts/bench_lm.py``), where an LSTM stepped one word at a time (the read fed into the next input)
cost 2.8x (docs/model.md). The ``tiny`` config (the embedded default model) has it on.

Test-time decoding is greedy argmax for ``max_length`` steps (the original's default; its beam search was
"buggy" and unused), or beam search (``decode`` with ``beam_size`` > 1, :meth:`LanguageModel.beam_decode`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, input_dim: int, embed_dim: int, hidden_dim: int, max_length: int = 15,
                 image_every_step: bool = False, grid_channels: int = 0, grid_cells: int = 49,
                 grid_context: int = 0):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.image_every_step = image_every_step
        self.image_encoder = nn.Sequential(nn.Linear(input_dim, embed_dim), nn.ReLU())
        self.embedding = nn.Embedding(vocab_size + 3, embed_dim)
        self.attention = GridAttention(grid_channels, grid_cells, embed_dim, hidden_dim,
                                       context_layers=grid_context) if grid_channels else None
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

    @property
    def uses_grid(self) -> bool:
        """Whether ``forward`` and ``greedy_decode`` need the regions' RoI grids (``grid_channels > 0``)."""
        return self.attention is not None

    def _memory(self, grid: torch.Tensor | None, p: int) -> torch.Tensor | None:
        if self.attention is None:
            return None
        if grid is None or grid.shape[0] != p:
            got = "none" if grid is None else f"{grid.shape[0]}"
            raise ValueError(f"this language model attends over the RoI grid: pass one grid per region "
                             f"({p} regions, grids: {got})")
        return self.attention.memory(grid)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """codes P x D, labels P x T (word ids, 0-padded) -> logits P x (T + 2) x (V + 1).

        ``grid``: P x C x S x S RoI features, required when the model attends over them (``uses_grid``)."""
        p = labels.shape[0]
        tokens = labels.masked_fill(labels == 0, self.null_token)
        start = torch.full((p, 1), self.start_token, dtype=torch.long, device=labels.device)
        image = self.image_encoder(codes)[:, None]
        seq = torch.cat((image, self.embedding(torch.cat((start, tokens), 1))), 1)
        out, _ = self._run_lstm(self._inject(seq, image))
        return self._predict(out, self._memory(grid, p))

    def _run_lstm(self, steps: torch.Tensor, state=None):
        """``self.lstm``, in float32 under a CPU bfloat16 autocast where the CPU has no native bfloat16 kernels:
        oneDNN then has no bfloat16 LSTM and refuses it ("could not create a primitive descriptor", measured on
        an AVX2-only AMD EPYC), while the other layers fall back to slower bfloat16 code that works."""
        if (steps.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not _cpu_has_native_bf16()):
            with torch.autocast("cpu", enabled=False):
                return self.lstm(steps.float(), None if state is None else tuple(s.float() for s in state))
        return self.lstm(steps, state)

    def _predict(self, out: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """LSTM outputs P x S x H -> word logits, through the grid read when the model attends."""
        return self.output(out if memory is None else self.attention(memory, out))

    def _inject(self, steps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """With ``image_every_step``, append the image encoding to each step's input (P x S x E -> P x S x 2E)."""
        if not self.image_every_step:
            return steps
        return torch.cat((steps, image.expand(-1, steps.shape[1], -1)), 2)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy of each region's words and END over the number of regions; ``weights`` (P,
        optional) multiplies each region's share."""
        p = labels.shape[0]
        if p == 0:
            return logits.sum() * 0
        ce = self._caption_nll(logits, labels)
        if weights is not None:
            ce = ce * weights.to(ce.dtype)
        return ce.sum() / p

    @torch.no_grad()
    def log_likelihood(self, codes: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """log p(caption | region) of each row: ``labels`` P x T (word ids, 0-padded), summed over its words and
        END. The paper's retrieval and open-world detection rank regions by it (``densecap search``)."""
        if labels.shape[0] == 0:
            return codes.new_zeros(0)
        return -self._caption_nll(self(codes, labels, grid), labels)

    def _caption_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each region's words and END, summed over time (P)."""
        p, t = labels.shape
        targets = torch.full((p, t + 2), -100, dtype=torch.long, device=labels.device)
        targets[:, 1:t + 1] = torch.where(labels > 0, labels - 1, torch.full_like(labels, -100))
        lengths = (labels > 0).sum(1)
        targets[torch.arange(p, device=labels.device), lengths + 1] = self.vocab_size  # END
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="none").reshape(p, -1).sum(1)

    @torch.no_grad()
    def greedy_decode(self, codes: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """codes K x D (and their K RoI grids when ``uses_grid``) -> word ids K x max_length (0 after the end)."""
        k = codes.shape[0]
        tokens = torch.zeros((k, self.max_length), dtype=torch.long, device=codes.device)
        if k == 0:
            return tokens
        memory = self._memory(grid, k)
        image = self.image_encoder(codes)[:, None]
        _, state = self._run_lstm(self._inject(image, image))
        x = self.embedding(torch.full((k, 1), self.start_token, dtype=torch.long, device=codes.device))
        alive = torch.ones(k, dtype=torch.bool, device=codes.device)
        for step in range(self.max_length):
            out, state = self._run_lstm(self._inject(x, image), state)
            cls = self._predict(out, memory)[:, 0].argmax(-1)
            ended = cls == self.vocab_size
            alive &= ~ended
            tokens[:, step] = torch.where(alive, cls + 1, torch.zeros_like(cls))
            if not alive.any():
                break
            x = self.embedding((cls + 1).clamp(max=self.vocab_size + 1))[:, None]
        return tokens

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: torch.Tensor | None = None, beam_size: int = 1,
               length_alpha: float = 0.0) -> torch.Tensor:
        """Greedy argmax (``beam_size`` 1, the original) or :meth:`beam_decode`; word ids K x max_length."""
        if beam_size <= 1:
            return self.greedy_decode(codes, grid)
        return self.beam_decode(codes, grid, beam_size, length_alpha)

    @torch.no_grad()
    def beam_decode(self, codes: torch.Tensor, grid: torch.Tensor | None = None, beam_size: int = 3,
                    length_alpha: float = 0.0) -> torch.Tensor:
        """Beam search: the ``beam_size`` likeliest prefixes of each region are kept at every step; of the
        finished ones, the caption with the highest ``log p / (words + 1) ** length_alpha`` wins (the END counts
        as a word; 0: the likeliest sequence, which favours short captions). codes K x D -> word ids K x
        max_length, as :meth:`greedy_decode`. The regions' beams step together as one batch, and a region
        leaves it once all its beams have ended.

        Greedy decoding commits to the likeliest first word, so a meaning said in several wordings ("two red
        stars", "a pair of red stars") loses to one said one way even when the meaning is likelier
        (docs/model.md); the beam scores whole captions."""
        k, b = codes.shape[0], beam_size
        device = codes.device
        n_cls = self.vocab_size + 1  # words 0..V-1 and END (class V)
        result = torch.zeros((k, self.max_length), dtype=torch.long, device=device)
        if k == 0:
            return result
        memory = self._memory(grid, k)
        memory = None if memory is None else memory.repeat_interleave(b, 0)
        image = self.image_encoder(codes)[:, None]
        _, (h, c) = self._run_lstm(self._inject(image, image))
        image = image.repeat_interleave(b, 0)
        state = (h.repeat_interleave(b, 1), c.repeat_interleave(b, 1))
        x = self.embedding(torch.full((k * b, 1), self.start_token, dtype=torch.long, device=device))
        # The working tensors hold the regions still being decoded (``active``: their rows in the result), b
        # rows each; a region leaves once all its beams have ended, so short captions stop costing steps.
        active = torch.arange(k, device=device)
        # every beam starts as the same empty caption: only the first may spread, or the beams would be copies
        scores = torch.full((k, b), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished = torch.zeros((k, b), dtype=torch.bool, device=device)
        words = torch.zeros((k, b), dtype=torch.long, device=device)
        tokens = torch.zeros((k, b, self.max_length), dtype=torch.long, device=device)
        carry = torch.full((n_cls,), float("-inf"), device=device)
        carry[self.vocab_size] = 0.0  # an ended caption continues only by END, at no cost
        beams = torch.arange(b, device=device)
        for step in range(self.max_length):
            a = len(active)
            out, state = self._run_lstm(self._inject(x, image), state)
            logp = torch.log_softmax(self._predict(out, memory)[:, 0].float(), -1).view(a, b, n_cls)
            logp = torch.where(finished[..., None], carry, logp)
            scores, flat = (scores[..., None] + logp).view(a, -1).topk(b, dim=1)
            origin, cls = flat // n_cls, flat % n_cls
            tokens, words = tokens.gather(1, origin[..., None].expand_as(tokens)), words.gather(1, origin)
            finished = finished.gather(1, origin) | (cls == self.vocab_size)
            tokens[..., step] = torch.where(finished, torch.zeros_like(cls), cls + 1)
            words = words + (~finished).long()
            done = finished.all(1) if step < self.max_length - 1 else torch.ones_like(finished[:, 0])
            if done.any():
                ranked = scores[done] / (words[done] + 1).float() ** length_alpha if length_alpha else scores[done]
                result[active[done]] = tokens[done][torch.arange(int(done.sum()), device=device), ranked.argmax(1)]
            keep = (~done).nonzero()[:, 0]
            if not len(keep):
                break
            rows = (keep[:, None] * b + beams).view(-1)  # the kept regions' rows, in the new beam order
            pick = (torch.arange(a, device=device)[:, None] * b + origin).view(-1)[rows]  # their parents' rows
            state = (state[0][:, pick], state[1][:, pick])
            if len(keep) < a:
                active, scores, finished, words, tokens, cls = (t[keep] for t in (active, scores, finished, words,
                                                                                 tokens, cls))
                image = image[rows]
                memory = None if memory is None else memory[rows]
            x = self.embedding((cls + 1).clamp(max=self.vocab_size + 1).view(-1, 1))
        return result


class GridAttention(nn.Module):
    """Scaled dot-product attention of LSTM outputs over a region's RoI grid cells (Luong-style, after the LSTM).

    ``memory(grid)``: R x C x S x S -> R x S*S x E (each cell projected, plus a learned embedding of its place);
    ``forward(memory, out)``: outputs R x L x H query the cells (keys = values = memory) -> ``tanh(W [out; read])``,
    R x L x H, what the output layer reads instead of ``out``.
    """

    def __init__(self, channels: int, cells: int, dim: int, hidden_dim: int, context_layers: int = 0):
        super().__init__()
        self.cell = nn.Linear(channels, dim)
        self.context = nn.ModuleList(CellContext(dim) for _ in range(context_layers))
        self.place = nn.Parameter(torch.randn(cells, dim) * 0.02)
        self.query = nn.Linear(hidden_dim, dim)
        self.combine = nn.Linear(hidden_dim + dim, hidden_dim)
        self.scale = dim ** -0.5

    def memory(self, grid: torch.Tensor) -> torch.Tensor:
        cells = grid.flatten(2).transpose(1, 2)  # R x S*S x C
        if cells.shape[1] != self.place.shape[0]:
            raise ValueError(f"grid attention was built for {self.place.shape[0]} cells, got {cells.shape[1]}")
        memory = torch.relu(self.cell(cells) + self.place)
        for layer in self.context:
            memory = layer(memory)
        return memory

    def forward(self, memory: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(torch.bmm(self.query(out), memory.transpose(1, 2)) * self.scale, 2)  # R x L x S*S
        read = torch.bmm(weights.to(memory.dtype), memory)
        return torch.tanh(self.combine(torch.cat((out, read.to(out.dtype)), 2)))


class CellContext(nn.Module):
    """One pre-norm transformer layer over a region's grid cells (R x N x D -> R x N x D): multi-head
    self-attention, then a two-layer MLP, each added to its input. The layers that write into the residual
    start at zero, so a trained model given this layer captions as before until training moves it (``--init``).

    Why: the words read the grid one soft look at a time, and one look cannot compare two places. Whether a box's
    two objects are alike (a group, not a relation) and how many alike ones it holds are comparisons between
    cells; after this layer each cell can carry them."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"grid context: {dim} channels do not split into {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        for layer in (self.proj, self.mlp[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(r, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(r, n, d)
        x = x + self.proj(read)
        return x + self.mlp(self.norm2(x))
