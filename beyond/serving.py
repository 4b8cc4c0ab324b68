"""Continuous batching over a paged cache: many requests, one model call per step.

Static batching pads a batch, runs it until its longest request ends, and only then takes new
work: rows that finished early sit idle. Iteration-level scheduling (Orca, Yu et al., OSDI 2022)
decides again at every step: a request leaves the batch the step it ends, and a waiting one joins
the next. The paged pool of beyond/paged.py gives each request memory a block at a time, so
joining costs only the blocks its prompt needs.

    engine = Engine(model, num_blocks=64, block_size=16)
    a = engine.submit(prompt_ids, max_new_tokens=20)                     greedy
    b = engine.submit(other_ids, 20, temperature=0.8, top_k=40, seed=1)  seeded sampling
    engine.step()              one model call; returns {request id: the token it made}
    engine.run()               steps until every request is done: {request id: its new tokens}

One step, whiteboard order:

    1. schedule   every running request takes its next tokens: one to decode, or (a request
                  just admitted, or back after preemption) its whole sequence so far to prefill.
                  If the blocks they need are not free, the newest running request is preempted
                  until they are. Then waiting requests are admitted, oldest first, while their
                  prefill's blocks are free (and max_running allows).
    2. batch      the rows' new tokens, right-aligned in a (B, T) array (left padding); a
                  PagedBatch over their sequences says which tokens are real. The decoding rows
                  (one token each) and the prefilling rows go in two arrays: in one, every
                  decoding row would be padded to the widest prompt admitted with it.
    3. call       model(ids, batch, last_only=True): one forward for the decodes and one for
                  the prefills (a step that admits nothing makes one call).
    4. emit       a row whose sequence is now all cached picks its next token from its logits,
                  with its own sampler; a request that emits eos_id or reaches max_new_tokens
                  is finished and gives its blocks back.

The policy when blocks run out: admit optimistically (only the prefill must fit), and when a
step needs more blocks than are free, preempt and recompute, as vLLM and nano-vllm do: the newest
running request gives all its blocks back and goes to the head of the queue; when it returns it
prefills its prompt and every token it had made. Its sampler draws only when a token is emitted,
never while it recomputes, so a preempted request still makes exactly the tokens it would alone.
A request that could never fit the whole pool is refused at submit, so the oldest running
request always progresses. With token_budget, a step feeds at most that many tokens: decodes
first, then prefills in chunks (a long prompt no longer stalls everyone's next token).

Sharing (docs/sharing.md). With prefix_caching a request admitted takes every cached full block
of its sequence from the pool's index (beyond/prefix.py) and computes only the rest, never less
than its last token (its logits come from that row); every block that fills is identified after
the step. fork(id, n) makes n more samples of a request's prompt: a fork of a request that has
not emitted yet waits for its prefill and then shares every block of it, the partly full last one
included (copy-on-write in the pool); a fork of a running request shares its blocks now. Sample
j draws from np.random.default_rng([seed, j]) (the request itself, sample 0, from
default_rng(seed)). With cascade, the fast path reads a prefix rows share once for all of them
(beyond/cascade.py).

Exactness: every request's tokens are generate_cached's on its prompt alone, and in float64 its
logits agree to 1e-10, shared, cached or forked (tests/test_serving.py, tests/test_sharing.py,
and verify.py's checks 18 and 19). docs/serving.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from beyond.paged import BLOCK_SIZE, BlockPool, PagedBatch
from block import GPT
from parts.checks import is_int, optional_positive_int, positive_int, token_ids
from parts.sampling import Sampler

WAITING, RUNNING, FINISHED, CANCELLED = "waiting", "running", "finished", "cancelled"


@dataclass(eq=False)
class Request:
    """One request and how far it has got. Its sequence is prompt + tokens; `cached` of them
    are in the pool (0 while waiting: a preempted request keeps its tokens, not its blocks)."""

    id: int
    prompt: np.ndarray  # (P,) token ids
    max_new_tokens: int
    eos_id: int | None
    sampler: Sampler  # its own: a seeded one holds its own random stream
    tokens: list[int] = field(default_factory=list)  # new tokens emitted so far
    logits: list[np.ndarray] = field(default_factory=list)  # (V,) each token was chosen from
    state: str = WAITING
    cached: int = 0  # tokens of its sequence held in the pool
    admitted: int = -1  # when it last became running (the newest is preempted first)
    seed: int | None = None  # the group's seed: sample j draws from default_rng([seed, j])
    group: int = -1  # the request its samples were forked from (itself, if none)
    sample: int = 0  # j, its number in the group (0: the request submitted)
    follows: int | None = None  # a fork waiting for this request's prefill, to share its blocks

    def sequence(self) -> np.ndarray:
        """prompt + the tokens made: what a prefill after preemption recomputes. (P + n,)"""
        return np.concatenate([self.prompt, np.asarray(self.tokens, dtype=np.int64)])

    @property
    def pending(self) -> int:
        """Tokens of its sequence not yet in the pool: 1 for a decode, P + n for a prefill."""
        return len(self.prompt) + len(self.tokens) - self.cached


class Result(NamedTuple):
    """What a request made: tokens (N,), the logits (N, V) each was chosen from (empty without
    keep_logits), and its state (finished, cancelled, or still waiting or running)."""

    tokens: np.ndarray
    logits: np.ndarray
    state: str


class Engine:
    """Continuous batching of requests for one model over one paged pool (see the module
    docstring). Drives the model only through its public call, so the readable GPT (keys
    gathered through the tables) and FastGPT (a walk over the blocks) both serve."""

    def __init__(
        self, model: GPT, num_blocks: int, block_size: int = BLOCK_SIZE,
        max_running: int | None = None, *, token_budget: int | None = None,
        shuffle: int | None = None, poison: bool = True, keep_logits: bool = True,
        prefix_caching: bool = False, cascade: bool = False,
    ) -> None:
        """num_blocks blocks of block_size tokens per layer, in the model's dtype. max_running:
        the most requests in a step (None: as many as the pool holds); token_budget: the most
        tokens fed in a step (None: every prefill whole); shuffle, poison: BlockPool's options
        (a seed for a shuffled free list; NaN in free blocks); keep_logits: keep each token's
        logits row (result(id).logits); prefix_caching: share cached full blocks between
        requests (beyond/prefix.py); cascade: the fast path reads a shared prefix once per
        group (beyond/cascade.py). Refused (TypeError/ValueError) before anything is
        built: a model that is not a GPT, or one whose sequences have no length limit (see
        check_pageable), and any size < 1."""
        if not isinstance(model, GPT):
            raise TypeError(f"Engine: model must be a GPT (or FastGPT), got "
                            f"{type(model).__name__}")
        check_pageable(model)
        num_blocks = positive_int("Engine num_blocks", num_blocks)
        block_size = positive_int("Engine block_size", block_size)
        self.max_running = optional_positive_int("Engine max_running", max_running)
        self.token_budget = optional_positive_int("Engine token_budget", token_budget)
        for name, flag in (("keep_logits", keep_logits), ("prefix_caching", prefix_caching),
                           ("cascade", cascade)):
            if not isinstance(flag, bool):
                raise TypeError(f"Engine {name} must be True or False, got {flag!r}")
        c = model.config
        self.pool = BlockPool(c.n_layers, *model.kv_shape, num_blocks, block_size, model.dtype,
                              shuffle, poison, prefix_caching)
        self.model, self.keep_logits, self.cascade = model, keep_logits, cascade
        self.group_sizes: dict[int, int] = {}  # group -> samples made so far
        self.requests: dict[int, Request] = {}  # every request ever submitted, by id
        self.waiting: deque[Request] = deque()  # admitted from the left
        self.running: list[Request] = []  # in the order they were admitted
        self.admissions = self.preemptions = self.steps = 0
        self.in_run = False

    # --- requests in and out ---------------------------------------------------------------------

    def submit(
        self, prompt_ids: np.ndarray | list[int], max_new_tokens: int, eos_id: int | None = None,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        seed: int | None = None,
    ) -> int:
        """Queue a request; returns its id. Greedy unless temperature > 0, which needs a seed:
        the request draws from np.random.default_rng(seed), as generate_cached(...,
        rng=np.random.default_rng(seed)) would on its prompt alone. Refused (ValueError/
        TypeError, the engine unchanged): a prompt that is not 1-D ids of the vocabulary or is
        empty, a prompt plus max_new_tokens past max_seq_len or past what the whole pool holds,
        an eos_id outside the vocabulary, a sampling setting Sampler refuses; RuntimeError
        during run()."""
        self.refuse_in_run("submit")
        c = self.model.config
        if isinstance(prompt_ids, (list, tuple, np.ndarray)) and len(prompt_ids) == 0:
            raise ValueError("prompt_ids must hold at least one token, got an empty prompt")
        prompt = token_ids("prompt_ids", prompt_ids, 1, c.vocab_size)
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        if eos_id is not None and (not is_int(eos_id) or not 0 <= eos_id < c.vocab_size):
            raise ValueError(f"eos_id must be None or a token id in [0, {c.vocab_size}), got "
                             f"{eos_id!r}")
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        if temperature and seed is None:
            raise ValueError(f"temperature={temperature!r} samples, so seed must be given (the "
                             "request's own random stream)")
        sampler = Sampler(temperature, top_k, top_p,
                          None if seed is None else np.random.default_rng(seed))
        need = prompt.size + max_new_tokens
        if need > c.max_seq_len:
            raise ValueError(f"prompt of {prompt.size} + max_new_tokens={max_new_tokens} = {need} "
                             f"tokens exceed max_seq_len={c.max_seq_len}")
        blocks = self.pool.blocks_for(need - 1)  # the last token is never fed back
        if blocks > self.pool.num_blocks:
            raise ValueError(f"prompt of {prompt.size} + max_new_tokens={max_new_tokens} needs "
                             f"up to {blocks} blocks of {self.pool.block_size}; the pool has "
                             f"{self.pool.num_blocks}: it could never run")
        request = Request(len(self.requests), prompt, max_new_tokens, eos_id, sampler,
                          seed=None if seed is None else int(seed))
        request.group = request.id
        self.group_sizes[request.id] = 1
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def fork(self, request_id: int, n: int = 1) -> list[int]:
        """n more samples of a waiting or running request: the same prompt, settings and
        max_new_tokens, each its own request (ids returned, in order) with its own random stream:
        sample j of the group draws from np.random.default_rng([seed, j]), j = 1, 2, ... in the
        order samples are made (a greedy request's samples are greedy). A request that has not
        emitted a token yet is forked at its first emission: its samples wait, then share every
        block of its prompt (the partly full last one too) and choose their first token from the
        same logits. A running request that has emitted is forked now: its samples share its
        blocks and its tokens so far. Refused (ValueError/TypeError, the engine unchanged): an
        unknown id, a finished or cancelled request, n < 1, or n so large that the request and
        its samples, each at its longest and sharing only the prompt's full blocks, could never
        be in the pool at once; RuntimeError during run()."""
        self.refuse_in_run("fork")
        parent = self.request(request_id)
        if parent.state in (FINISHED, CANCELLED):
            raise ValueError(f"fork: request {request_id} is already {parent.state}")
        n = positive_int("fork n", n)
        pool = self.pool
        shared = len(parent.prompt) // pool.block_size  # full prompt blocks, held once
        own = pool.blocks_for(len(parent.prompt) + parent.max_new_tokens - 1) - shared
        if shared + (n + 1) * own > pool.num_blocks:
            raise ValueError(f"fork n={n}: the request and {n} samples need up to {shared} "
                             f"shared + {n + 1} x {own} blocks of {pool.block_size}; the pool "
                             f"has {pool.num_blocks}: they could never run together")
        ids = []
        for _ in range(n):
            j = self.group_sizes[parent.group]
            self.group_sizes[parent.group] += 1
            s = parent.sampler
            rng = None if parent.seed is None else np.random.default_rng([parent.seed, j])
            child = Request(len(self.requests), parent.prompt, parent.max_new_tokens,
                            parent.eos_id, Sampler(s.temperature, s.top_k, s.top_p, rng),
                            list(parent.tokens), list(parent.logits), seed=parent.seed,
                            group=parent.group, sample=j)
            self.requests[child.id] = child
            if not parent.tokens:  # waits for the parent's prefill, then shares it
                child.follows = parent.id
                self.waiting.append(child)
            elif parent.state == RUNNING and self.has_room():
                pool.fork(parent.id, child.id)
                child.cached = parent.cached
                self.admit(child)
            else:  # a preempted parent holds no blocks: the sample recomputes on its own
                self.waiting.append(child)
            ids.append(child.id)
        return ids

    def cancel(self, request_id: int) -> None:
        """Drop a waiting or running request; a running one's blocks are free at once. Its
        tokens so far stay readable (result). Refused (ValueError): an id never given, a
        request already finished or cancelled; RuntimeError during run()."""
        self.refuse_in_run("cancel")
        request = self.request(request_id)
        if request.state in (FINISHED, CANCELLED):
            raise ValueError(f"cancel: request {request_id} is already {request.state}")
        for follower in self.waiting:  # its forks no longer wait for it: they prefill alone
            if follower.follows == request.id:
                follower.follows = None
        if request.state == WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            self.pool.release(request.id)
            request.cached = 0
        request.state = CANCELLED

    def request(self, request_id: int) -> Request:
        """The request with this id, or ValueError."""
        if not is_int(request_id) or request_id not in self.requests:
            raise ValueError(f"no request has id {request_id!r} (ids 0 .. "
                             f"{len(self.requests) - 1} were given)")
        return self.requests[request_id]

    def result(self, request_id: int) -> Result:
        """Tokens (N,) and logits (N, V) of a request so far, and its state."""
        r = self.request(request_id)
        V = self.model.config.vocab_size
        logits = np.array(r.logits) if r.logits else np.empty((0, V), self.model.dtype)
        return Result(np.array(r.tokens, dtype=np.int64), logits, r.state)

    def refuse_in_run(self, what: str) -> None:
        if self.in_run:
            raise RuntimeError(f"Engine.{what}: run() is in progress; submit and cancel between "
                               "steps (drive step() yourself to interleave them)")

    # --- stepping --------------------------------------------------------------------------------

    def run(self) -> dict[int, np.ndarray]:
        """Step until no request is waiting or running: {request id: its new tokens}, for every
        request submitted so far (a cancelled one: what it made before)."""
        self.refuse_in_run("run")
        self.in_run = True
        try:
            while self.waiting or self.running:
                self.step_once()
        finally:
            self.in_run = False
        return {rid: self.result(rid).tokens for rid in self.requests}

    def step(self) -> dict[int, int]:
        """One iteration: {request id: the token it made} (a request mid-prefill makes none)."""
        self.refuse_in_run("step")
        return self.step_once()

    def step_once(self) -> dict[int, int]:
        rows = self.schedule()
        if not rows:
            if self.waiting:  # submit's checks make this impossible: say so loudly if not
                raise RuntimeError("Engine: requests wait but none can be scheduled")
            return {}
        self.steps += 1
        made = {}
        decodes = [row for row in rows if row[1] == 1]  # one new token each: never padded
        prefills = [row for row in rows if row[1] > 1]  # padded only to each other's width
        for group in (decodes, prefills):
            if group:
                made.update(self.forward(group))
        return made

    def forward(self, rows: list[tuple[Request, int]]) -> dict[int, int]:
        """One call of the model on rows of (request, tokens it feeds), right-aligned in one
        (B, T) array; each request whose sequence is then all cached emits its next token."""
        T = max(take for _, take in rows)
        ids = np.zeros((len(rows), T), dtype=np.int64)  # left padding: pad id 0, never real
        for b, (request, take) in enumerate(rows):
            ids[b, T - take:] = request.sequence()[request.cached:request.cached + take]
        batch = PagedBatch(self.pool, [request.id for request, _ in rows],
                           [take for _, take in rows], self.cascade)
        logits = self.model(ids, batch, last_only=True)[:, -1]  # (B, 1, V) -> (B, V)
        made = {}
        for (request, take), row in zip(rows, logits, strict=True):
            request.cached += take
            if self.pool.index is not None:  # name the blocks that filled (prefix caching)
                self.pool.identify(request.id, request.sequence())
            if request.pending == 0:  # its whole sequence is in: the last row chooses
                samples = self.attach_followers(request)  # they share its blocks first
                for sample in [request, *samples]:
                    made[sample.id] = self.emit(sample, row)
        return made

    def attach_followers(self, parent: Request) -> list[Request]:
        """The forks waiting for this request's prefill, now running on its blocks (each table
        holding every block, the partly full last one too); a fork max_running leaves out
        prefills on its own later."""
        attached, parents = [], [parent]
        for p in parents:  # a fork of a waiting fork joins when that one does
            for child in [r for r in self.waiting if r.follows == p.id]:
                child.follows = None
                if self.has_room():
                    self.waiting.remove(child)
                    self.pool.fork(p.id, child.id)
                    child.cached = p.cached
                    self.admit(child)
                    attached.append(child)
                    parents.append(child)
        return attached

    def emit(self, request: Request, logits: np.ndarray) -> int:
        """The request's next token from its logits (V,), by its own sampler (one draw, if it
        samples); a request that is done finishes and gives its blocks back."""
        token = int(request.sampler(logits[None])[0])  # (V,) -> (1, V) -> (1,)
        request.tokens.append(token)
        if self.keep_logits:
            request.logits.append(logits.copy())
        if token == request.eos_id or len(request.tokens) == request.max_new_tokens:
            request.state = FINISHED
            self.running.remove(request)
            self.pool.release(request.id)
        return token

    # --- scheduling ------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Request, int]]:
        """This step's rows, (request, tokens it feeds), in admission order: the running
        requests (the newest preempted until the blocks they need are free), then the waiting
        ones that fit, oldest first (a fork waiting for its parent's prefill is not admitted:
        it joins at its parent's first token); none are admitted in a step that preempted."""
        preempted = False
        while True:
            rows = self.feed(self.running, self.token_budget)
            need = self.pool.blocks_needed_all({r.id: take for r, take in rows})
            if need <= self.pool.available:
                break
            self.preempt(max(self.running, key=lambda r: r.admitted))
            preempted = True
        free = self.pool.available - need
        budget = None if self.token_budget is None else self.token_budget - sum(
            take for _, take in rows)
        for request in [r for r in self.waiting if r.follows is None]:
            if preempted or (budget is not None and budget <= 0) or not self.has_room():
                break
            hits = self.cached_prefix(request)
            cached = len(hits) * self.pool.block_size
            pending = len(request.sequence()) - cached
            take = pending if budget is None else min(pending, budget)
            # its new blocks, and the idle cached ones it takes out of the available ones
            cost = self.pool.blocks_for(cached + take) - len(hits) + sum(
                self.pool.refs[b] == 0 for b in hits)
            if cost > free:
                break  # first come, first served: no one overtakes the head of the queue
            self.waiting.remove(request)
            if hits:
                self.pool.share(request.id, hits)
                request.cached = cached
            self.admit(request)
            rows.append((request, take))
            free -= cost
            budget = None if budget is None else budget - take
        return rows

    def cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks holding the first full blocks of the request's sequence (none
        without prefix caching), never all of it: its last token is always computed, since its
        logits choose the next token."""
        if self.pool.index is None:
            return []
        sequence = request.sequence()
        return self.pool.index.lookup(sequence, (len(sequence) - 1) // self.pool.block_size)

    def has_room(self) -> bool:
        """max_running allows one more running request."""
        return self.max_running is None or len(self.running) < self.max_running

    @staticmethod
    def feed(running: list[Request], budget: int | None) -> list[tuple[Request, int]]:
        """How many tokens each running request feeds: all it has pending, or within a token
        budget decodes first, then prefill chunks in admission order."""
        if budget is None:
            return [(r, r.pending) for r in running]
        takes = {}
        for r in sorted(running, key=lambda r: (r.pending > 1, r.admitted)):
            if budget > 0:
                takes[r.id] = min(r.pending, budget)
                budget -= takes[r.id]
        return [(r, takes[r.id]) for r in running if r.id in takes]

    def admit(self, request: Request) -> None:
        request.state, request.admitted = RUNNING, self.admissions
        self.admissions += 1
        self.running.append(request)

    def preempt(self, request: Request) -> None:
        """Take a running request's blocks and put it at the head of the queue; it keeps its
        tokens (and its sampler, untouched) and recomputes its cache when it returns."""
        self.running.remove(request)
        if request.id in self.pool.tables:
            self.pool.release(request.id)
        request.state, request.cached = WAITING, 0
        self.waiting.appendleft(request)
        self.preemptions += 1

    def stats(self) -> dict[str, int]:
        """Counts of the pool and the queue, now (and the peak of blocks in use)."""
        pool = self.pool
        states = [r.state for r in self.requests.values()]
        return {"blocks_total": pool.num_blocks, "block_size": pool.block_size,
                "blocks_in_use": pool.blocks_in_use, "peak_blocks_in_use": pool.peak,
                "blocks_cached_idle": pool.idle, "copies_on_write": pool.copies,
                "prefix_hit_blocks": 0 if pool.index is None else pool.index.hits,
                "tokens_cached": pool.tokens_cached, "requests_waiting": len(self.waiting),
                "requests_running": len(self.running),
                "requests_finished": states.count(FINISHED),
                "requests_cancelled": states.count(CANCELLED),
                "preemptions": self.preemptions, "steps": self.steps}


def check_pageable(model: GPT) -> None:
    """ValueError unless every request on `model` has a length limit. A paged cache keeps every
    key of a sequence until it ends; a model with RoPE and a sliding window has no position
    limit (GPTConfig.max_positions is None), and its right cache is a rolling buffer that
    forgets what leaves the window (beyond/window.py). Paged, such a request would grow
    without bound while its queries read only the last W keys, and no request could be refused
    for never fitting. A windowed model with learned positions stops at max_seq_len, and pages
    exactly (the mask hides the keys out of the window)."""
    if model.config.max_positions is None:
        raise ValueError("Engine: this model (RoPE with a sliding window) has no position limit, "
                         "so a request's blocks could grow without bound while attention reads "
                         "only its last sliding_window keys; serve it with a rolling buffer "
                         "(beyond/window.py), not a paged cache")
