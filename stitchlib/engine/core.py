"""StitchEngine: continuous batching of many stitches over one weight-shared anchor pair.

State: a fixed number of cache slots; running requests occupy slots 0..n-1, sorted by stitch (so
each block's rows are a contiguous slice); waiting requests queue for a free slot. One `step()`:

  1. decode: one token for every running request, all stitches in one forward (one CUDA graph
     replay on GPU), sampled on the device;
  2. release: requests that hit a stop token or max_tokens leave, their slots are compacted away;
  3. admit: waiting requests take free slots (rows move so the batch stays sorted; at most one row
     per stitch group is moved) and are prefilled, which yields their first token.

Chunked prefill (`prefill_chunk`): a step prefills at most that many prompt tokens, continuing the
prompts already in progress (oldest first) before admitting new ones, so one long prompt delays the
running rows' next token by one chunk, not by its whole prefill. A request holds its slot while its
prompt is being written; the decode steps in between run its row too (the batch stays one sorted
block) but discard that row's token, and the K/V it writes lands at the next unwritten position,
which the next chunk overwrites before anything attends to it.

Every decoding request gets exactly one token per step. Tokens cross to the host once per step (the
values callers asked for); nothing else syncs. Single-threaded: call from one thread.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..model import StitchedLM
from ..types import EngineConfig, SamplingParams
from ..sampling import TokenLogprob, draw, make_generator, token_logprobs
from ..space import Stitch
from .cache import StaticKVCache
from .blocks import block_fn
from .graphs import DecodeGraphs, compile_layer_fn
from .plan import RoutePlan, build_plan
from .runner import StitchRunner, call_layer, model_lock

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]


@dataclass(eq=False)
class StepOutput(Mapping[int, int]):
    """What one `step()` did. As a mapping it is `tokens` (request id -> the token it got this step, one
    per decoding request), so `for rid, tok in engine.step().items()` reads as it always did."""

    tokens: dict[int, int] = field(default_factory=dict)
    finished: dict[int, FinishReason] = field(default_factory=dict)  # finished in this step (gone afterwards)
    decoded: dict[str, int] = field(default_factory=dict)  # stitch id -> rows decoded (prefilling ones included)
    prefilled: dict[str, int] = field(default_factory=dict)  # stitch id -> padded prompt tokens prefilled
    # for the requests that asked for them: the logprob of the token each got, and the prompt logprobs
    # of those whose prompt this step completed (the first entry None: nothing to score it against)
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)

    def __getitem__(self, rid: int) -> int:
        return self.tokens[rid]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Request:
    rid: int
    stitch: Stitch
    key: int  # the stitch's PST slot: rows are sorted by it
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    generator: torch.Generator | None
    row: int = -1  # cache slot while running
    length: int = 0  # positions written in the cache
    produced: int = 0
    tokens: list[int] = field(default_factory=list)
    finished: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token, first None

    @property
    def prefilling(self) -> bool:
        """Holds a slot but its prompt is not fully written yet (chunked prefill)."""
        return self.length < len(self.prompt)


class StitchEngine:
    """Mixed-stitch continuous batching over static caches. See the module docstring."""

    def __init__(self, model: StitchedLM, config: EngineConfig | None = None, *,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()) -> None:
        self.model = model
        self.cfg = cfg = config or EngineConfig()
        self.device = model.small_anchor.device
        self.dtype = model.small_anchor.dtype
        self.eos = frozenset(eos_token_ids)
        self._lock = model_lock(model)
        served = [model.get(s) for s in cfg.stitches] if cfg.stitches else list(model.stitches)
        self.served = {s.id for s in served}
        S, L = model.small_anchor, model.large_anchor
        dS, dL = S.stats.num_layers, L.stats.num_layers
        self.d_small, self.d_large = dS, dL
        small_layers = sorted({i for s in served for i in s.small_blocks(dS)})
        large_layers = sorted({i for s in served for i in s.large_blocks(dL)})

        def cache(anchor, layers):
            if not layers:
                return None
            st = anchor.stats
            return StaticKVCache(layers, n_layers=st.num_layers, slots=cfg.max_slots, kv_heads=st.num_kv_heads,
                                 head_dim=st.head_dim, max_seq=cfg.max_seq_len, dtype=anchor.dtype, device=self.device)

        self.caches = {"small": cache(S, small_layers), "large": cache(L, large_layers)}
        layers = [*S.layers, *L.layers]
        self.block_fn = block_fn(layers) if cfg.fast_blocks else call_layer
        layer_fn = (compile_layer_fn(cfg.compile_mode, block_fn(layers, compiled=True) if cfg.fast_blocks else call_layer)
                    if cfg.compile_layers else self.block_fn)
        self.runner = StitchRunner(model, self.caches["small"], self.caches["large"], max_seq=cfg.max_seq_len,
                                   decode_layer_fn=layer_fn, prefill_layer_fn=self.block_fn,
                                   compiled=cfg.compile_layers)
        # Per-slot device state: the last token of every row and its length (= next position).
        self.tokens = torch.zeros(cfg.max_slots, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(cfg.max_slots, dtype=torch.long, device=self.device)
        self.rows: list[Request] = []  # running, sorted by key; rows[i].row == i
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # in slots, prompt partly written; oldest first
        self.requests: dict[int, Request] = {}
        self._out = StepOutput()  # what the current step did; `step()` returns it
        self._next_rid = 0
        self._plans: OrderedDict[tuple[int, ...], RoutePlan] = OrderedDict()
        use_graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else self.device.type == "cuda"
        self.graphs = None
        self.graph_error: str | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.runner, self.tokens, self.lengths, max_graphs=cfg.max_graphs)
        self.pad = cfg.pad_to_bucket if cfg.pad_to_bucket is not None else use_graphs

    # ---- public API ---------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], stitch_id: str, params: SamplingParams | None = None, *,
                    rid: int | None = None) -> int:
        """Queue a request; it is prefilled by the next `step()` that has a free slot. -> request id."""
        params = params or SamplingParams()
        if stitch_id not in self.served:
            raise KeyError(f"stitch {stitch_id!r} is not served by this engine; served: {', '.join(sorted(self.served))}")
        if not prompt_ids:
            raise ValueError("empty prompt")
        need = len(prompt_ids) + params.max_tokens
        if need > self.cfg.max_seq_len:
            raise ValueError(f"prompt + max_tokens = {need} exceeds the engine's max_seq_len of {self.cfg.max_seq_len}")
        if rid is None:
            rid = self._next_rid
        if rid in self.requests:
            raise ValueError(f"request id {rid} is already in use")
        self._next_rid = max(self._next_rid, rid) + 1
        st = self.model.get(stitch_id)
        req = Request(rid=rid, stitch=st, key=self.model.slot[st.id], prompt=list(prompt_ids), params=params,
                      stops=frozenset(self.eos | set(params.stop_token_ids)),
                      generator=make_generator(params.seed, self.device))
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, rid: int) -> bool:
        """Drop a request (waiting or running) now, freeing its slot. -> whether it existed."""
        req = self.requests.pop(rid, None)
        if req is None:
            return False
        if req.row >= 0:
            if req.prefilling:
                self.prefilling.remove(req)
            self._remove(req.row)
        else:
            self.waiting.remove(req)
        req.finished = "abort"
        return True

    @torch.no_grad()
    def step(self) -> StepOutput:
        """Advance every active request by one token. -> the step's `StepOutput` ({request id: token} as
        a mapping); requests that finished in it are in its `finished` and are gone afterwards."""
        self._out = out = StepOutput()
        if len(self.prefilling) < len(self.rows):  # someone is decoding
            running = list(self.rows)
            out.decoded.update(Counter(r.stitch.id for r in running))
            for req, tok in zip(running, self._decode().tolist()):
                if not req.prefilling:
                    self._emit(req, tok)
            self._release(running)
        self._release(self._admit())
        return out

    def has_unfinished(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def free_slots(self) -> int:
        return self.cfg.max_slots - len(self.rows)

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values() if c is not None)

    def graph_stats(self) -> dict:
        """What the decode-graph path did so far: captures, replays, evictions, capture seconds, and the
        error that switched it off (`active` False from then on; benchmarks record this next to timings)."""
        if self.graphs is None:
            return {"active": False, "error": None}
        return {"active": self.graph_error is None, "error": self.graph_error, **self.graphs.stats()}

    @torch.no_grad()
    def decode_burst(self, steps: int) -> torch.Tensor:
        """Benchmark helper: `steps` decode steps of the running rows with no host reads, no stop
        checks and no admission. -> tokens [n, steps] (on the device)."""
        if self.prefilling:
            raise ValueError("decode_burst needs every running prompt fully prefilled")
        longest = max(r.length for r in self.rows) + steps
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"{steps} more steps exceed max_seq_len ({longest} > {self.cfg.max_seq_len})")
        return torch.stack([self._decode() for _ in range(steps)], dim=1)

    # ---- one step -----------------------------------------------------------------------------
    def _plan(self, key: tuple[int, ...]) -> RoutePlan:
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(key, self.model.stitches, self.d_small, self.d_large, self.device)
            self._plans[key] = plan
            while len(self._plans) > 4 * self.cfg.max_graphs:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _kv_len(self, positions: int) -> int:
        b = self.cfg.kv_block
        return min(self.cfg.max_seq_len, math.ceil(positions / b) * b)

    def _bucket(self, n: int) -> int:
        return min([b for b in self.cfg.batch_buckets if b >= n] + [self.cfg.max_slots]) if self.pad else n

    def _decode(self) -> torch.Tensor:
        """One token for every running row; device tensor [n]."""
        n = len(self.rows)
        # Padding rows (free slots n..B-1) run as the last row's stitch: the groups stay contiguous and
        # one graph serves every batch size of the bucket. They write K/V only into free slots, at
        # stale positions < max_seq_len, and their logits are dropped.
        B = self._bucket(n)
        plan = self._plan(tuple(r.key for r in self.rows) + (self.rows[-1].key,) * (B - n))
        kv_len = self._kv_len(max(r.length for r in self.rows) + 1)
        with self._lock:
            logits = None
            if self.graphs is not None and self.graph_error is None:
                try:
                    logits = self.graphs.run(plan, kv_len)
                except RuntimeError as e:  # capture not supported by some op here: serve eagerly, loudly
                    log.error("CUDA graph capture failed (%s: %s); decoding without graphs from now on",
                              type(e).__name__, e)
                    self.graph_error = f"{type(e).__name__}: {e}"
                    self.graphs.graphs.clear()  # free the captured graphs; keep the counts (graph_stats)
            if logits is None:
                logits = self.runner.forward(self.tokens[:B, None], self.lengths[:B, None], slice(0, B), plan,
                                             kv_len)
            tok = self._sample(logits[:n] if B > n else logits, self.rows)
            self._logprobs(logits, tok, self.rows)
        self.tokens[:n] = tok
        self.lengths[:n] += 1
        for r in self.rows:
            if not r.prefilling:
                r.length += 1
        if self.prefilling:  # their next token position stays where the next chunk starts
            rows = torch.tensor([r.row for r in self.prefilling], device=self.device)
            self.lengths[rows] = torch.tensor([r.length for r in self.prefilling], device=self.device)
        return tok

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Greedy for temperature 0, else `stitchlib.sampling.draw` (temperature + top-p, each
        request's own generator) on the sampling rows only: the greedy check needs no host sync here,
        the parameters being on the host."""
        # max(-1).indices, not argmax: the same first maximal index, ~6x faster on CPU over a 152k
        # vocabulary in bf16 (0.5 -> 0.08 ms per row; benchmarks/QUANT.md section 4)
        tok = logits.max(-1).indices
        idx = [i for i, r in enumerate(reqs) if r.params.temperature > 0 and not r.prefilling]
        if not idx:
            return tok
        dev = logits.device
        sub = logits[idx] if len(idx) < len(reqs) else logits
        temp = torch.tensor([reqs[i].params.temperature for i in idx], dtype=torch.float32, device=dev)
        top_p = torch.tensor([reqs[i].params.top_p for i in idx], dtype=torch.float32, device=dev)
        sampled = draw(sub, temp, top_p, [reqs[i].generator for i in idx])
        if len(idx) == len(reqs):
            return sampled
        tok[torch.tensor(idx, device=dev)] = sampled
        return tok

    def _logprobs(self, logits: torch.Tensor, tok: torch.Tensor, reqs: list[Request]) -> None:
        """Logprobs of the tokens just taken, for the (non-prefilling) rows that asked for them;
        logits: [>= len(reqs), V] raw, tok: [len(reqs)]."""
        idx = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and not r.prefilling]
        if not idx:
            return
        sel = torch.tensor(idx, device=logits.device)
        for i, lp in zip(idx, token_logprobs(logits[sel], tok[sel], [reqs[i].params.logprobs for i in idx])):
            reqs[i].logprobs.append(lp)
            self._out.logprobs[reqs[i].rid] = lp

    def _prompt_logprobs(self, full: dict[int, torch.Tensor], pieces: list[tuple[Request, int]],
                         start: list[int]) -> None:
        """Prompt logprobs from the logits at every position of a prefill piece: position p scores
        prompt token p+1 (the last position of a finished prompt scores the first output token, not here)."""
        for i, logits in full.items():
            r, n = pieces[i]
            if start[i] == 0:
                r.prompt_logprobs.append(None)  # the first token has no context to be scored against
            m = min(n, len(r.prompt) - 1 - start[i])  # positions whose next token is still prompt
            if m > 0:
                targets = torch.tensor(r.prompt[start[i] + 1: start[i] + 1 + m], device=logits.device)
                r.prompt_logprobs += token_logprobs(logits[:m], targets, [r.params.prompt_logprobs] * m)
            if not r.prefilling:
                self._out.prompt_logprobs[r.rid] = r.prompt_logprobs

    def _emit(self, req: Request, tok: int) -> None:
        self._out.tokens[req.rid] = tok
        req.tokens.append(tok)
        req.produced += 1
        if tok in req.stops:
            req.finished = "stop"
        elif req.produced >= req.params.max_tokens:
            req.finished = "length"

    def _release(self, reqs: list[Request]) -> None:
        for req in reqs:
            if req.finished is not None and req.rid in self.requests:
                self._remove(req.row)
                del self.requests[req.rid]
                self._out.finished[req.rid] = req.finished

    def _admit(self) -> list[Request]:
        """Spend this step's prefill budget: first on the prompts already in progress (oldest first),
        then on waiting requests, which take free slots. -> the requests that got their first token."""
        budget = self.cfg.prefill_chunk or math.inf
        pieces: list[tuple[Request, int]] = []  # (request, prompt tokens to write now)
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(len(req.prompt) - req.length, budget)
            pieces.append((req, n))
            budget -= n
        while budget > 0 and self.waiting and len(self.rows) < self.cfg.max_slots:
            req = self.waiting.popleft()
            self._insert(req)
            self.prefilling.append(req)
            n = min(len(req.prompt), budget)
            pieces.append((req, n))
            budget -= n
        if not pieces:
            return []
        pieces.sort(key=lambda p: p[0].row)
        chunk: list[tuple[Request, int]] = []
        for piece in pieces:
            t = max(n for _, n in [*chunk, piece])
            if chunk and t * (len(chunk) + 1) > self.cfg.prefill_tokens:
                self._prefill(chunk)
                chunk = []
            chunk.append(piece)
        self._prefill(chunk)
        done = [r for r, _ in pieces if not r.prefilling]
        self.prefilling = [r for r in self.prefilling if r.prefilling]
        return done

    def _prefill(self, pieces: list[tuple[Request, int]]) -> None:
        """Write the next `n` prompt tokens of each request (sorted by row) at positions length..length+n-1
        of its slot, right-padded to the longest piece. Pad tokens sit at later positions of their own
        row (clamped to the slot's last position, which a prompt never reaches since max_tokens >= 1),
        so their junk K/V is overwritten before anything attends to it. Requests whose prompt is now
        complete sample their first token."""
        B, T = len(pieces), max(n for _, n in pieces)
        ids = torch.zeros(B, T, dtype=torch.long)
        start = torch.tensor([r.length for r, _ in pieces], dtype=torch.long)
        for i, (r, n) in enumerate(pieces):
            ids[i, :n] = torch.tensor(r.prompt[r.length: r.length + n])
        ids = ids.to(self.device)
        pos = (start[:, None] + torch.arange(T)).clamp(max=self.cfg.max_seq_len - 1).to(self.device)  # [B, T]
        end = [r.length + n for r, n in pieces]
        last = torch.tensor([n - 1 for _, n in pieces], dtype=torch.long, device=self.device)
        rows = [r.row for r, _ in pieces]
        cache_rows = (slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1))
                      else torch.tensor(rows, dtype=torch.long, device=self.device))
        plan = self._plan(tuple(r.key for r, _ in pieces))
        for (r, _), e in zip(pieces, end):
            r.length = e
            self._out.prefilled[r.stitch.id] = self._out.prefilled.get(r.stitch.id, 0) + T
        done = [i for i, (r, _) in enumerate(pieces) if not r.prefilling]
        scored = [i for i, (r, _) in enumerate(pieces) if r.params.prompt_logprobs is not None]
        with self._lock:
            if scored:
                logits, full = self.runner.forward_with_rows(ids, pos, cache_rows, plan, self._kv_len(max(end)),
                                                             last, scored)
                self._prompt_logprobs(full, pieces, start.tolist())
            else:
                logits = self.runner.forward(ids, pos, cache_rows, plan, self._kv_len(max(end)), last=last)
            tok = None
            if done:
                reqs = [pieces[i][0] for i in done]
                sub = logits[done] if len(done) < B else logits
                tok = self._sample(sub, reqs)
                self._logprobs(sub, tok, reqs)
        self.lengths[cache_rows] = torch.tensor(end, dtype=torch.long, device=self.device)
        if tok is None:
            return
        done_rows = torch.tensor([rows[i] for i in done], dtype=torch.long, device=self.device)
        self.tokens[done_rows] = tok
        for i, t in zip(done, tok.tolist()):
            self._emit(pieces[i][0], t)

    # ---- slots: keep rows compact and sorted by key, moving at most one row per group -------------
    def _move(self, src: int, dst: int) -> None:
        req = self.rows[src]
        st = req.stitch
        for name, blocks in (("small", st.small_blocks(self.d_small)), ("large", st.large_blocks(self.d_large))):
            if len(blocks) and self.caches[name] is not None:
                self.caches[name].move_row(src, dst, blocks, req.length)
        self.tokens[dst] = self.tokens[src]
        self.lengths[dst] = self.lengths[src]
        self.rows[dst] = req
        req.row = dst

    def _insert(self, req: Request) -> None:
        """Open a slot at the end of req's key group: every later group shifts up by one row by
        moving its first row to its end."""
        self.rows.append(req)  # placeholder at the new last slot
        hole = len(self.rows) - 1
        i = hole - 1
        while i >= 0 and self.rows[i].key > req.key:
            b = i
            while b - 1 >= 0 and self.rows[b - 1].key == self.rows[i].key:
                b -= 1
            self._move(b, hole)
            hole, i = b, b - 1
        self.rows[hole] = req
        req.row = hole

    def _remove(self, row: int) -> None:
        """Free slot `row`: the last row of its group fills it, then each later group's last row
        fills the hole left before it; the hole ends at the last slot."""
        key = self.rows[row].key
        self.rows[row].row = -1
        e = row
        while e + 1 < len(self.rows) and self.rows[e + 1].key == key:
            e += 1
        if e != row:
            self._move(e, row)
        hole, j = e, e + 1
        while j < len(self.rows):
            last = j
            while last + 1 < len(self.rows) and self.rows[last + 1].key == self.rows[j].key:
                last += 1
            self._move(last, hole)
            hole, j = last, last + 1
        self.rows.pop()
