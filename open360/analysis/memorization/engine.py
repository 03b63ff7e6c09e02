"""Scoring engine: batched greedy continuation with a static KV cache, and a teacher-forced screen.

The LLM360 memorization score of one training sequence: the first ``k`` tokens are the prompt, the
model continues greedily (argmax, no sampling, no beam, no early stop at EOS) for ``l`` tokens, and
the score is the fraction of those ``l`` tokens equal to the sequence's true tokens ``k..k+l-1``.

Two modes, always labelled in results:

- ``greedy`` (exact): one prefill forward over the ``k`` prompt tokens, then ``l-1`` single-token
  steps through the model's static KV cache. All prompts have exactly ``k`` tokens and all
  continuations exactly ``l`` tokens, so every batch has one fixed shape and needs no padding; on
  CUDA the whole continuation of a batch is captured once as a CUDA graph and replayed. Positions
  are Python ints by default (``sliced_decode``): step ``i`` attends over the ``k+i`` filled cache
  slots only, with no mask; every step still has a fixed shape, so the one graph holds all of them.
  On CUDA those single-token attentions run in the Triton kernel below (``decode_kernel``), which
  reads each step's keys and values near memory bandwidth (SDPA's kernels take a fixed ~250 us a
  layer at batch 1024 whatever the length). ``sliced_decode=False`` passes 0-dim device tensors instead: one shape for
  every step (attention over all ``k+l`` slots under a mask), for models that take only that.
- ``teacher_forced`` (screen): one forward over the true ``k+l-1`` tokens; the prediction at each
  of the ``l`` positions is conditioned on the *true* prefix. It is exact for ``full_match`` and for
  ``prefix_match`` (the greedy continuation equals the truth up to the first teacher-forced miss),
  and its token accuracy is an estimate of ``token_match`` that is at least the greedy score except
  when a greedy continuation re-joins the truth after diverging (rare; measured in the tests).

The model contract (docs/ARCHITECTURE.md): ``model(input_ids, kv_cache=None, start_pos=0) -> logits``
of shape [B, T, V], and ``KVCache.allocate(model, batch_size, max_len, device, dtype)``.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MODES = ("greedy", "teacher_forced")

try:  # Triton ships with CUDA builds of PyTorch; without it decode steps use SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Single-token decode attention over the filled cache slots: one program per (sequence, head) reads its
# <= 128 keys and values once, in fp32 (SDPA's kernels for a 1-row query run at a fixed ~250 us per
# layer at batch 1024 whatever the length, below half the memory bandwidth).
DECODE_KERNEL_MAX_LEN = 128

if triton is not None:

    @triton.autotune(  # tuned once per cache-length bucket, on the warm-up run before graph capture
        configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4, 8)], key=["block_l", "head_dim"]
    )
    @triton.jit
    def _decode_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        seq_len,
        scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_ob,
        stride_oh,
        n_heads: tl.constexpr,
        head_dim: tl.constexpr,
        block_l: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_heads
        h = pid % n_heads
        d = tl.arange(0, head_dim)
        pos = tl.arange(0, block_l)
        valid = pos < seq_len
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + pos[:, None] * stride_kl + d[None, :],
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        p = tl.exp(s - tl.max(s, axis=0))
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + pos[:, None] * stride_vl + d[None, :],
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        o = tl.sum(p[:, None] * v, axis=0) / tl.sum(p, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + d, o.to(o_ptr.dtype.element_ty))

    @torch.library.custom_op("open360::memorization_decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, _, d = q.shape
        out = torch.empty(b, 1, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
        seq_len = k.shape[2]
        _decode_attention_kernel[(b * h,)](
            q,
            k,
            v,
            out,
            seq_len,
            scale,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            n_heads=h,
            head_dim=d,
            block_l=max(16, triton.next_power_of_2(seq_len)),
        )
        return out

    @_decode_attention_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, _, d = q.shape
        return q.new_empty(b, 1, h, d).transpose(1, 2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per (sequence, head) over every key given: q [B, H, 1, D], k/v [B, H, L, D]
    -> [B, H, 1, D]. The Triton kernel where it applies (CUDA, L <= 128, power-of-two D, unit last
    stride), else SDPA. Softmax and both products in fp32."""
    usable = (
        triton is not None
        and q.is_cuda
        and k.shape[2] <= DECODE_KERNEL_MAX_LEN
        and q.shape[-1] in (16, 32, 64, 128, 256)
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )
    if usable:
        return _decode_attention_op(q, k, v, scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


# `batch_size=0` on CUDA: no larger batch than this (1.4B model on one H100: 2,480 seq/s at 2,048,
# 2,540 at 4,096, benchmarks/RESULTS.md), so smaller models do not hold memory for nothing.
AUTO_BATCH_MAX = 4096

# Builds a KV cache for (model, batch_size, max_len, device, dtype); the default uses open360.models.
CacheFactory = Callable[[torch.nn.Module, int, int, torch.device, torch.dtype], Any]


def default_cache_factory(
    model: torch.nn.Module, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
) -> Any:
    """Allocate open360's static KV cache for `model` (imported lazily: the engine takes any model)."""
    from open360.models import KVCache

    return KVCache.allocate(model, batch_size, max_len, device, dtype)


@dataclass
class ScoreResult:
    """Per-sequence results of one scoring pass, in the order of the input sequences."""

    mode: str  # "greedy" (exact) or "teacher_forced" (screen)
    k: int  # prompt tokens
    l: int  # noqa: E741 - continuation tokens, the name LLM360 and the issue use
    matched: np.ndarray  # int16 [N]: continuation tokens equal to the truth
    prefix_match: np.ndarray  # int16 [N]: length of the matching prefix of the continuation
    predicted: np.ndarray  # int32 [N, l]: the continuation (greedy) or per-position argmax (teacher-forced)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> np.ndarray:
        """float32 [N]: the LLM360 memorization score, matched / l."""
        return self.matched.astype(np.float32) / float(self.l)

    @property
    def token_match(self) -> float:
        """Mean score over the sequences (Analysis360's "Memorization Score")."""
        return float(self.score.mean()) if len(self.matched) else float("nan")

    @property
    def full_match(self) -> float:
        """Fraction of sequences whose whole continuation matched (k-extractable)."""
        return float((self.matched == self.l).mean()) if len(self.matched) else float("nan")

    def rows(self, lo: int, hi: int) -> ScoreResult:
        """Sequences lo..hi-1 of this result, with their share of its seconds."""
        share = (hi - lo) / len(self.matched) if len(self.matched) else 0.0
        return ScoreResult(
            self.mode,
            self.k,
            self.l,
            self.matched[lo:hi],
            self.prefix_match[lo:hi],
            self.predicted[lo:hi],
            self.seconds * share,
            dict(self.info),
        )

    @staticmethod
    def concat(parts: list[ScoreResult], mode: str, k: int, l: int, info: dict[str, Any]) -> ScoreResult:  # noqa: E741
        """One result from consecutive parts (an empty list gives an empty result)."""
        if not parts:
            empty = np.zeros(0, dtype=np.int16)
            return ScoreResult(mode, k, l, empty, empty, np.zeros((0, l), np.int32), 0.0, dict(info))
        return ScoreResult(
            mode,
            k,
            l,
            np.concatenate([p.matched for p in parts]),
            np.concatenate([p.prefix_match for p in parts]),
            np.concatenate([p.predicted for p in parts]),
            sum(p.seconds for p in parts),
            dict(parts[-1].info),
        )


@dataclass
class _Group:
    """One group of `MemorizationScorer.score_groups` on its way through the shared batches."""

    key: Any
    unscored: int
    parts: list[ScoreResult] = field(default_factory=list)


def match_counts(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matched, prefix_match) per row of two [B, l] token tensors."""
    eq = predicted == truth
    matched = eq.sum(dim=1)
    prefix = eq.int().cumprod(dim=1).sum(dim=1)
    return matched, prefix


def _logits_at(
    model: Any, input_ids: torch.Tensor, lo: int, hi: int, kv_cache: Any = None, start_pos: Any = 0
) -> torch.Tensor:
    """Logits of positions lo..hi-1 of `input_ids` only: the LM head (a vocab-wide matmul) is applied to
    those rows when the model exposes `hidden_states` and `logits` (open360's Decoder), else sliced."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        return model.logits(model.hidden_states(input_ids, kv_cache=kv_cache, start_pos=start_pos)[:, lo:hi])
    return model(input_ids, kv_cache=kv_cache, start_pos=start_pos)[:, lo:hi]


@torch.no_grad()
def greedy_continuation(
    model: Any, prompts: torch.Tensor, cont_len: int, kv_cache: Any, sliced: bool = True
) -> torch.Tensor:
    """Greedy continuation of `cont_len` tokens for [B, k] prompts through `kv_cache` -> [B, cont_len].

    The cache must hold at least k + cont_len - 1 positions for batch B; it is overwritten from position 0,
    so one cache serves every batch of the same shape. `sliced`: decode positions are Python ints, so
    each step attends over the filled slots only (one static shape per step; graph-capturable). Else
    they are 0-dim device tensors: one shape for every step, attention over the whole cache under a mask.
    """
    b, k = prompts.shape
    out = torch.empty(b, cont_len, dtype=torch.long, device=prompts.device)
    tok = _logits_at(model, prompts, k - 1, k, kv_cache, 0)[:, 0].argmax(dim=-1)
    out[:, 0] = tok
    positions: Any = (
        range(k, k + cont_len - 1) if sliced else torch.arange(k, k + cont_len - 1, device=prompts.device)
    )
    for i in range(1, cont_len):
        logits = _logits_at(model, tok[:, None], 0, 1, kv_cache, positions[i - 1])
        tok = logits[:, 0].argmax(dim=-1)
        out[:, i] = tok
    return out


@torch.no_grad()
def teacher_forced_predictions(model: Any, tokens: torch.Tensor, k: int, cont_len: int) -> torch.Tensor:
    """Argmax at positions k..k+cont_len-1, each given the true prefix: [B, >= k+cont_len-1] -> [B, l]."""
    end = k + cont_len - 1
    return _logits_at(model, tokens[:, :end], k - 1, end).argmax(dim=-1)


# dtype= values besides "auto": the short name first, then torch's.
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype a scorer on `device` computes in for `dtype` ("auto": bf16 on CUDA, fp32 else)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"memorization: dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class MemorizationScorer:
    """Scores batches of training sequences with one model; reuses its cache and CUDA graph.

    `model` is put in eval mode and cast to `dtype` ("auto": bf16 on CUDA, fp32 on CPU) on `device`.
    `batch_size` sequences go through the model at a time (0: as many as fit, see `_auto_batch_size`);
    a partial batch is filled with copies of its first row (their results are dropped) so that every
    batch has the same shape. `score_groups` lets many small groups share batches.
    `cuda_graphs` (CUDA only) captures the whole greedy continuation of a batch once and replays it;
    if capture fails the scorer warns and runs eagerly. `compile` wraps the model in torch.compile.
    `sliced_decode` (default): each decode step attends over the filled cache slots only (see
    `greedy_continuation`); False keeps one fixed shape for every step (attention under a mask).
    `decode_kernel` (CUDA, sliced decode, Triton present): single-token steps use `decode_attention`
    (sets each block's `attn.decode_attention` hook on the model in place; False clears it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        k: int = 32,
        l: int = 32,  # noqa: E741 - continuation length, LLM360's name
        batch_size: int = 256,
        mode: str = "greedy",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        cuda_graphs: bool = True,
        compile: bool = False,
        cache_factory: CacheFactory | None = None,
        sliced_decode: bool = True,
        decode_kernel: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"memorization: mode={mode!r} is not one of {MODES}")
        if k < 1 or l < 1:
            raise ValueError(f"memorization: k={k} and l={l} must both be >= 1")
        if batch_size < 0:
            raise ValueError(f"memorization: batch_size={batch_size} must be >= 1, or 0 for auto")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.k, self.l, self.batch_size, self.mode = k, l, batch_size, mode
        self.sliced_decode = bool(sliced_decode)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.decode_kernel = (
            bool(decode_kernel) and self.sliced_decode and self.device.type == "cuda" and triton is not None
        )
        for module in self.model.modules():  # open360 Attention modules carry the hook; others are left alone
            if hasattr(module, "decode_attention"):
                module.decode_attention = decode_attention if self.decode_kernel else None
        self.cache_factory = cache_factory or default_cache_factory
        if self.batch_size == 0:  # probed eagerly, before any compilation sees a batch shape
            self.batch_size = self._auto_batch_size()
        self._forward: Any = self.model
        if compile:  # compile the blocks in place (the Decoder's own hook), else the whole module
            # Sliced decode changes the attended length every step: let the int position go symbolic
            # (automatic dynamic) rather than recompiling per position.
            dynamic = None if self.sliced_decode else False
            blocks = getattr(self.model, "blocks", None)
            if isinstance(blocks, torch.nn.ModuleList):
                for block in blocks:
                    block.compile(dynamic=dynamic)
            else:
                self._forward = torch.compile(self.model, dynamic=dynamic)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda" and mode == "greedy"
        self._cache: Any = None
        self._cache_batch = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None
        self.graph_error: str | None = None

    @torch.no_grad()
    def _auto_batch_size(self, probe: int = 8) -> int:
        """`batch_size=0`: 64 on CPU; on CUDA the largest multiple of 64 up to AUTO_BATCH_MAX whose KV
        cache and activations fit in 80% of the free memory, scaled from a probe batch's measured use
        (activations counted twice: the CUDA graph's warm-up and its capture pool each hold a set)."""
        if self.device.type != "cuda":
            return 64
        tokens = torch.zeros(probe, self.k + self.l, dtype=torch.long, device=self.device)
        for _ in range(2):  # the first pass allocates one-off workspaces; the second is measured
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cache = self.cache_factory(self.model, probe, self.k + self.l, self.device, self.dtype)
            cached = torch.cuda.memory_allocated(self.device)
            if self.mode == "greedy":  # the prefill is the widest point of a greedy continuation
                _logits_at(self.model, tokens[:, : self.k], self.k - 1, self.k, cache, 0).argmax(-1)
            else:
                teacher_forced_predictions(self.model, tokens, self.k, self.l)
            peak = torch.cuda.max_memory_allocated(self.device)
            del cache
        torch.cuda.synchronize(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)  # + what the allocator holds but no tensor uses
        available = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        per_sequence = ((cached - before) + 2 * (peak - cached)) / probe
        fits = int(0.8 * available // per_sequence)
        return max(1, min(AUTO_BATCH_MAX, fits // 64 * 64 or fits))

    # -- one fixed-shape batch -------------------------------------------------------------
    def _ensure_cache(self, batch_size: int) -> Any:
        if self._cache is None or self._cache_batch != batch_size:
            self.release()
            self._cache = self.cache_factory(self.model, batch_size, self.k + self.l, self.device, self.dtype)
            self._cache_batch = batch_size
        return self._cache

    def _greedy_eager(self, prompts: torch.Tensor) -> torch.Tensor:
        cache = self._ensure_cache(prompts.shape[0])
        return greedy_continuation(self._forward, prompts, self.l, cache, self.sliced_decode)

    def _capture(self, prompts: torch.Tensor) -> None:
        with torch.cuda.device(self.device):
            self._capture_on_device(prompts)

    def _capture_on_device(self, prompts: torch.Tensor) -> None:
        cache = self._ensure_cache(prompts.shape[0])
        self._static_in = prompts.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the graph
                greedy_continuation(self._forward, self._static_in, self.l, cache, self.sliced_decode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = greedy_continuation(
                self._forward, self._static_in, self.l, cache, self.sliced_decode
            )
        self._graph = graph

    def _greedy_batch(self, prompts: torch.Tensor) -> torch.Tensor:
        if self.use_graphs:
            try:
                if self._graph is None or self._cache_batch != prompts.shape[0]:
                    self._capture(prompts)
                assert self._static_in is not None and self._static_out is not None and self._graph
                self._static_in.copy_(prompts)
                self._graph.replay()
                return self._static_out.clone()
            except Exception as err:  # capture can fail on models that sync with the host
                self.use_graphs, self._graph = False, None
                self.graph_error = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"memorization: CUDA graph capture failed ({self.graph_error}); decoding eagerly",
                    stacklevel=2,
                )
                torch.cuda.synchronize()
        return self._greedy_eager(prompts)

    def _batch(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "greedy":
            return self._greedy_batch(tokens[:, : self.k])
        return teacher_forced_predictions(self._forward, tokens, self.k, self.l)

    def _as_sequences(self, sequences: np.ndarray | torch.Tensor) -> torch.Tensor:
        seqs = torch.as_tensor(np.asarray(sequences) if not torch.is_tensor(sequences) else sequences)
        if seqs.ndim != 2 or seqs.shape[1] < self.k + self.l:
            raise ValueError(
                f"memorization: sequences have shape {tuple(seqs.shape)}, "
                f"need [N, >= k+l = {self.k + self.l}]"
                " tokens; lower k/l or use longer sequences"
            )
        return seqs[:, : self.k + self.l]

    # -- public ----------------------------------------------------------------------------
    def score_groups(
        self, groups: Iterable[tuple[Any, np.ndarray | torch.Tensor]]
    ) -> Iterator[tuple[Any, ScoreResult]]:
        """Score many groups of sequences (e.g. the data chunks of one checkpoint) through full batches.

        Consecutive groups share batches, so only the last batch of the whole stream is padded (scoring
        each group on its own pads each group's last batch: 1,000 sequences at batch 4,096 would cost
        4,096). Yields ``(key, result)`` per group (the key as given, any object), in input order, as
        soon as all its sequences are scored; each result carries its share of the batches' seconds.
        """
        queue: deque[_Group] = deque()  # groups not yet yielded, in input order
        pending: list[torch.Tensor] = []  # their unscored sequences, in the same order
        buffered = 0

        def score_first(n: int) -> None:
            nonlocal pending, buffered
            stream = torch.cat(pending)
            pending, buffered = ([stream[n:]] if n < len(stream) else []), buffered - n
            result, offset = self.score(stream[:n]), 0
            for group in queue:
                take = min(group.unscored, n - offset)
                if take == 0 and group.unscored:
                    break
                group.parts.append(result.rows(offset, offset + take))
                group.unscored -= take
                offset += take

        def finished() -> Iterator[tuple[Any, ScoreResult]]:
            while queue and queue[0].unscored == 0:
                group = queue.popleft()
                yield group.key, ScoreResult.concat(group.parts, self.mode, self.k, self.l, self._info())

        for key, sequences in groups:
            seqs = self._as_sequences(sequences)
            queue.append(_Group(key, len(seqs)))
            if len(seqs):
                pending.append(seqs)
                buffered += len(seqs)
            if buffered >= self.batch_size:
                score_first(buffered - buffered % self.batch_size)
            yield from finished()
        if buffered:
            score_first(buffered)
        yield from finished()

    @torch.no_grad()
    def score(self, sequences: np.ndarray | torch.Tensor) -> ScoreResult:
        """Score [N, >= k+l] token sequences (only the first k+l tokens are read)."""
        seqs = self._as_sequences(sequences)
        n = seqs.shape[0]
        if n == 0:
            return ScoreResult.concat([], self.mode, self.k, self.l, self._info())
        seqs = seqs.to(torch.long)
        predicted = np.empty((n, self.l), dtype=np.int32)
        matched = np.empty(n, dtype=np.int16)
        prefix = np.empty(n, dtype=np.int16)
        # One shape per scorer: a CUDA graph is captured for batch_size rows, so small inputs are padded
        # up to it rather than captured again; eager runs just use a smaller batch.
        bs = self.batch_size if self.use_graphs else min(self.batch_size, n)
        start = time.perf_counter()
        for lo in range(0, n, bs):
            hi = min(lo + bs, n)
            batch = seqs[lo:hi]
            rows = hi - lo
            if rows < bs:  # keep one shape: fill with copies of the first row, dropped below
                batch = torch.cat([batch, batch[:1].expand(bs - rows, -1)])
            batch = batch.to(self.device, non_blocking=True)
            pred = self._batch(batch)[:rows]
            m, p = match_counts(pred, batch[:rows, self.k : self.k + self.l])
            predicted[lo:hi] = pred.to("cpu", torch.int32).numpy()
            matched[lo:hi] = m.to("cpu", torch.int16).numpy()
            prefix[lo:hi] = p.to("cpu", torch.int16).numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return ScoreResult(self.mode, self.k, self.l, matched, prefix, predicted, seconds, self._info())

    def _info(self) -> dict[str, Any]:
        """How the scores were computed (stored with every cell)."""
        info: dict[str, Any] = {
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "device": str(self.device),
            "cuda_graphs": self.use_graphs,
            "decode_kernel": self.decode_kernel,
        }
        if self.graph_error:
            info["graph_error"] = self.graph_error
        return info

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy another checkpoint's weights (same architecture) into the model in place, cast to the
        scorer's dtype: the cache, the compiled blocks and the captured CUDA graph stay valid, so the
        next checkpoint of a run costs a copy instead of a model build, a compile and a graph capture.
        Raises on missing, unexpected or differently shaped weights (nothing is partially kept)."""
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"memorization: weights do not fit the scorer's model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, other shapes {sorted(shapes)[:5]}"
            )
        for name, tensor in own.items():
            tensor.copy_(state[name])

    def release(self) -> None:
        """Free the cache and graph (call before loading the next checkpoint on a small GPU)."""
        self._cache = self._graph = self._static_in = self._static_out = None
        self._cache_batch = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
