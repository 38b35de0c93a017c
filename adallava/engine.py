"""Continuous (iteration-level) batching with one execution plan and one KV cache per request.

vLLM batches at every decode step but runs one model for every request; the official AdaLLaVA runs one request at a
time. Here requests join and leave a running batch at decode-step boundaries, and each keeps the plan its prefill chose
(spec 2.4) for all its decode steps, whatever runs beside it:

    engine = Engine(model, max_batch_size=8)
    engine.add(Request("a", input_ids, pixel_values=..., budget=0.6, max_new_tokens=32))
    while engine.has_work:
        for event in engine.step():      # one token per active request; event.finished when a request ends
            ...
        engine.add(...)                   # joins at the next step; engine.cancel(id) leaves at once

One step = one decode step for every running request (one token each), then the prefill of waiting requests while
there is room (up to max_batch_size running): each is prefilled alone (B = 1, as `generate` does for a batch of one),
which fixes its plan and fills its own KV cache, and gives its first token. `step(on_event)` hands each event on as it
happens (a server passes its tokens on then, not after the step's last prefill). A request leaves at EOS, at its
max_new_tokens, or when the caller cancels it (a stop string, a client gone).

KV caches live in pools, one per (layer, way of running that layer): the full layer, or one partial set of heads and
neuron groups with its sliced weights. A request's cache for a layer is one row of its pool; a layer it skips holds no
cache. Pools stay dense (a leaving request's row is refilled by the pool's last row), so at a decode step every pool is
one `_run_layer` call on a view of its rows, each row writing and attending at its own slot (its own length). The
decoder layer, its sliced weights, masks and rotary embeddings are modeling.py's own: nothing of the decoder loop is
written twice. Greedy requests get the tokens they get alone; sampled ones draw from their own seeded generator.

Not supported: token_selection="fastv" (its prefill moves later layers to a second slot space; use generate()).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import budget as budgets
from . import cost
from .modeling import AdaLlavaForConditionalGeneration, DecodeState, _Group


@dataclass(eq=False)
class Request:
    request_id: str
    input_ids: torch.Tensor  # [T] or [1, T]
    pixel_values: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    budget: float = 1.0
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # sampling draws from a generator seeded with this (the global RNG when None)
    execution_plan: torch.Tensor | None = None  # [1, S, 2, H]: run this plan instead of the scheduler's
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    keep_logits: bool = False  # keep each step's logits in the Finished record (tests, analysis)


@dataclass
class Finished:
    request_id: str
    token_ids: list[int]  # generated ids, EOS included when it ended the request
    finish_reason: str  # "eos", "length", or the reason given to cancel()
    budget: float | None
    execution_plan: list[float] | None  # [num_layers]: fraction of each layer's units that ran
    plan: torch.Tensor | None  # [S, 2, H]
    flops: float | None  # analytic FLOPs, prefill + the decode steps run
    flops_breakdown: dict | None
    prompt_tokens: int
    joined_step: int | None  # the engine step of its prefill (None: cancelled while waiting)
    finished_step: int
    prefill_s: float
    logits: list[torch.Tensor] | None = None
    error: str | None = None  # finish_reason "error": why its prefill failed (the others ran on)


@dataclass
class TokenEvent:
    request_id: str
    token: int | None  # None: the request ended without a new token (a failed prefill)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: Finished | None = None


@dataclass(eq=False)
class _Row:
    req: Request
    budget: torch.Tensor  # [1] float64
    plan: torch.Tensor  # [1, S, 2, H]
    capacity: int
    key_valid: torch.Tensor  # [capacity] bool
    length: int  # cache slots filled
    position: int  # position id of the next token fed
    prompt_tokens: int
    n_images: int | None
    joined_step: int
    prefill_s: float
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    pools: list = field(default_factory=list)  # [(layer index, key)]
    logits: list | None = None


class _Pool:
    """The KV caches of every request that runs one layer one way: row j belongs to members[j]."""

    def __init__(self, weights):
        self.weights = weights
        self.k: torch.Tensor | None = None  # [rows >= len(members), n_kv, slots, head_dim]
        self.v: torch.Tensor | None = None
        self.members: list[_Row] = []

    def insert(self, row: _Row, k: torch.Tensor | None, v: torch.Tensor | None):
        n = len(self.members)
        self.members.append(row)
        if k is None:  # attention skipped in this layer: nothing to cache
            return
        if self.k is None:
            self.k, self.v = k.new_zeros((1, *k.shape[1:])), v.new_zeros((1, *v.shape[1:]))
        rows, slots = self.k.shape[0], self.k.shape[2]
        if n == rows or k.shape[2] > slots:  # grow: rows double, slots to the longest member
            new_rows, new_slots = (2 * rows if n == rows else rows), max(slots, k.shape[2])
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = old.new_zeros((new_rows, old.shape[1], new_slots, old.shape[3]))
                grown[:rows, :, :slots] = old
                setattr(self, name, grown)
        self.k[n].zero_()
        self.v[n].zero_()
        self.k[n, :, : k.shape[2]] = k[0]
        self.v[n, :, : v.shape[2]] = v[0]

    def remove(self, row: _Row):
        j, last = self.members.index(row), len(self.members) - 1
        if j != last:
            self.members[j] = self.members[last]
            if self.k is not None:
                self.k[j] = self.k[last]
                self.v[j] = self.v[last]
        self.members.pop()


class Engine:
    def __init__(self, model: AdaLlavaForConditionalGeneration, max_batch_size: int = 8, eos_token_id=None):
        if model.training:
            raise RuntimeError("the engine runs the inference path: call model.eval() first")
        if model.config.token_selection == "fastv":
            raise NotImplementedError("Engine does not support token_selection='fastv' (its prefill moves later "
                                      "layers to a second slot space); use model.generate()")  # fmt: skip
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.max_batch_size = model, max_batch_size
        eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos = set() if eos is None else set(eos if isinstance(eos, (list, tuple, set)) else [eos])
        self.waiting: deque[Request] = deque()
        self.running: list[_Row] = []
        self.pools: dict[int, dict] = {}  # layer index -> {key: _Pool}
        self.steps = 0  # steps run so far; the next step has this number

    # ------------------------------------------------------------------------------------------------ queue

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, request: Request):
        """Queue a request; it joins the running batch at the next step with room."""
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise ValueError(f"request {request.request_id!r}: max_new_tokens must be an integer >= 1, got "
                             f"{request.max_new_tokens!r}")  # fmt: skip
        ids = request.input_ids
        if ids.dim() == 2 and ids.shape[0] != 1 or ids.dim() not in (1, 2):
            raise ValueError(f"request {request.request_id!r}: input_ids must be one sequence ([T] or [1, T]), got "
                             f"shape {tuple(ids.shape)}")  # fmt: skip
        active = {r.request_id for r in self.waiting} | {r.req.request_id for r in self.running}
        if request.request_id in active:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        budgets.validate_budget(request.budget, 1, self.model.config)  # refuse now, not at its prefill
        self.waiting.append(request)

    def cancel(self, request_id: str, reason: str = "cancelled") -> Finished | None:
        """Take a request out now (waiting or running); its tokens so far come back. None if it is not here."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return Finished(request_id, [], reason, None, None, None, None, None, 0, None, self.steps, 0.0)
        for row in self.running:
            if row.req.request_id == request_id:
                return self._finish(row, reason, step=self.steps - 1)  # its last token came from the last step
        return None

    # ------------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, on_event: Callable[[TokenEvent], None] | None = None) -> list[TokenEvent]:
        """One decode step for every running request, then prefill waiting requests while there is room.

        on_event, when given, gets each event as soon as it exists: the running rows' tokens right after the decode,
        before any prefill of this step, and each joining request's first token right after its own prefill. A server
        that hands tokens on only when step() returns makes every token of a step wait for all of the step's prefills
        (a 1-2 token answer then finishes up to max_batch_size - 1 prefills after its token exists). The events are
        returned as well, in the same order."""
        events = self._decode() if self.running else []
        if on_event is not None:
            for ev in events:
                on_event(ev)
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting.popleft()
            try:
                ev = self._join(req)
            except Exception as e:  # noqa: BLE001 - one request's bad input must not fail the batch beside it
                fin = Finished(req.request_id, [], "error", None, None, None, None, None, 0, self.steps, self.steps,
                               0.0, error=f"{type(e).__name__}: {e}")  # fmt: skip
                ev = TokenEvent(req.request_id, None, finished=fin)
            events.append(ev)
            if on_event is not None:
                on_event(ev)
        self.steps += 1
        return events

    def _join(self, req: Request) -> TokenEvent:
        model, cfg = self.model, self.model.config
        t0 = time.perf_counter()
        ids = req.input_ids.view(1, -1).to(model.device)
        mask = torch.ones_like(ids) if req.attention_mask is None else req.attention_mask.view(1, -1).to(ids.device)
        pixels = None if req.pixel_values is None else req.pixel_values.to(model.device)
        embeds, mask, _, _ = model.prepare_inputs(ids, pixels, mask, None, None, req.image_sizes)
        budget = budgets.validate_budget(req.budget, 1, cfg)
        order = torch.sort(mask.long(), dim=1, stable=True).indices  # padding first, as generate() aligns prompts
        embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
        mask = mask.gather(1, order)
        h, mask, _, lat_pos = model.insert_latency_token(embeds, mask, None, model.latency_token(budget.to(embeds.device)))
        prompt_len = h.shape[1]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        capacity = prompt_len + req.max_new_tokens
        key_valid = torch.zeros(1, capacity, dtype=torch.bool, device=h.device)
        key_valid[:, :prompt_len] = mask.bool()
        state = DecodeState(capacity=capacity, key_valid=key_valid, plan=req.execution_plan)
        hidden, plan = model.decode(h, key_valid, position_ids, budget, lat_pos, state=state, plan=req.execution_plan)
        logits = model.lm_head(hidden[:, -1])
        generator = None
        if req.seed is not None and req.temperature > 0:
            generator = torch.Generator(device=model.device).manual_seed(req.seed)
        n_images = None
        if pixels is not None:
            n_images = int((ids == cfg.image_token_id).sum()) // cfg.image_seq_length
        row = _Row(req, budget, plan, capacity, key_valid[0], state.length, int(position_ids[0, -1]) + 1,
                   int(mask.sum()), n_images, self.steps, time.perf_counter() - t0, generator,
                   logits=[] if req.keep_logits else None)  # fmt: skip
        event = self._emit(row, logits[0])
        if event.finished is None:  # it decodes from the next step on: its caches go into the pools
            P = cfg.num_prefix_layers
            for i, groups in state.groups.items():
                for g in groups:  # a batch of one has at most one group per layer
                    key = "full" if g.rows is None else tuple((plan[0, i - P] > 0.5).flatten().tolist())
                    pool = self.pools.setdefault(i, {}).get(key)
                    if pool is None:
                        pool = self.pools[i][key] = _Pool(g.weights)
                    pool.insert(row, g.k, g.v)
                    row.pools.append((i, key))
            self.running.append(row)
        return event

    def _decode(self) -> list[TokenEvent]:
        model = self.model
        lm = model.model.language_model
        rows, dev = self.running, model.device
        B = len(rows)
        tokens = torch.tensor([r.tokens[-1] for r in rows], device=dev)
        h = model.get_input_embeddings()(tokens)[:, None]
        positions = torch.tensor([[r.position] for r in rows], device=dev)
        slot_list = [r.length for r in rows]
        n_keys = max(slot_list) + 1
        key_valid = torch.zeros(B, n_keys, dtype=torch.bool, device=dev)
        for j, r in enumerate(rows):
            r.key_valid[r.length] = True
            key_valid[j, : r.length + 1] = r.key_valid[: r.length + 1]
        slots = torch.tensor(slot_list, device=dev)
        masks = model._attention_masks(key_valid, slots[:, None], n_keys)
        cos, sin = lm.rotary_emb(h, positions)
        where = {id(r): j for j, r in enumerate(rows)}
        everyone = tuple(range(B))
        inputs: dict = {}  # (member rows, window) -> the rows' (index, cos, sin, mask, slots): most layers share them
        for i, layer in enumerate(model._layers):
            window = model._layer_window(i)
            for pool in self.pools.get(i, {}).values():
                members = tuple(where[id(r)] for r in pool.members)
                if (members, window) not in inputs:
                    nk = max(slot_list[j] for j in members) + 1  # the longest member's keys bound its attention
                    mask = masks[window][..., :nk]
                    if members == everyone:
                        inputs[members, window] = (None, cos, sin, mask, slots)
                    else:
                        idx = torch.tensor(members, device=dev)
                        inputs[members, window] = (idx, cos[idx], sin[idx], mask[idx], slots[idx])
                idx, c, s, mask, sl = inputs[members, window]
                n = len(members)
                group = _Group(None, pool.weights, None if pool.k is None else pool.k[:n],
                               None if pool.v is None else pool.v[:n])  # fmt: skip
                if idx is None:
                    h = model._run_layer(layer, pool.weights, h, c, s, mask, group, sl)
                else:
                    h = h.index_copy(0, idx, model._run_layer(layer, pool.weights, h[idx], c, s, mask, group, sl))
        logits = model.lm_head(lm.norm(h)[:, -1])
        events = []
        for j, r in enumerate(list(rows)):
            r.length += 1
            r.position += 1
            events.append(self._emit(r, logits[j]))
        return events

    def _emit(self, row: _Row, logits: torch.Tensor) -> TokenEvent:
        """Pick the row's next token from its logits [V]; finish the row at EOS or its max_new_tokens."""
        req = row.req
        token = int(self.model._next_token(logits[None], req.temperature > 0, req.temperature or 1.0, req.top_k,
                                           req.top_p, row.generator)[0])  # fmt: skip
        row.tokens.append(token)
        if row.logits is not None:
            row.logits.append(logits.detach().float().cpu())
        event = TokenEvent(req.request_id, token)
        if req.top_logprobs is not None:
            lp = logits.float().log_softmax(-1)
            event.logprob = float(lp[token])
            if req.top_logprobs > 0:
                top = lp.topk(min(req.top_logprobs, lp.shape[-1]))
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if token in self.eos:
            event.finished = self._finish(row, "eos")
        elif len(row.tokens) >= req.max_new_tokens:
            event.finished = self._finish(row, "length")
        return event

    def _finish(self, row: _Row, reason: str, step: int | None = None) -> Finished:
        for i, key in row.pools:
            pool = self.pools[i][key]
            pool.remove(row)
            if not pool.members:  # free its caches
                del self.pools[i][key]
                if not self.pools[i]:
                    del self.pools[i]
        row.pools = []
        if row in self.running:
            self.running.remove(row)
        model = self.model
        generated = torch.tensor([len(row.tokens)])
        breakdown = cost.flops_breakdown(model.config, row.plan, torch.tensor([row.prompt_tokens]), generated,
                                         None if row.n_images is None else torch.tensor([row.n_images]), None)
        return Finished(
            row.req.request_id, list(row.tokens), reason, float(row.budget[0]),
            [round(float(x), 6) for x in model.execution_plan_fractions(row.plan)[0]], row.plan[0],
            float(breakdown[0]["total"]), breakdown[0], row.prompt_tokens, row.joined_step,
            self.steps if step is None else step,
            row.prefill_s, row.logits,
        )  # fmt: skip


__all__ = ["Engine", "Request", "TokenEvent", "Finished"]
