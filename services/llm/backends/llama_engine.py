"""Continuous batching over one llama.cpp context: every conversation is a sequence of it.

As llama-server does it: the context holds `sequences` sequence ids, each with its own part of
the KV cache (non-unified: a sequence attends only to its own cells), and one `llama_decode` per
step carries the next token of every sequence that asked for one, plus a piece of any prompt
being read. The weights are read once per step for all of them, which is where batching wins.

Threads: the context is only ever touched from one thread (`executor`), in submission order, so
no two calls can touch a sequence at once. The scheduler runs on the event loop: it collects the
sequences that asked for a token (`next_token`), runs one step on the engine thread, and hands
each its token. A sequence that does not ask (its reader paused for flow control) is simply left
out of the batch; one that ends (`end`) is dropped at once, and its sampler is freed on the
engine thread after the step in flight, before any later work for that sequence id.

Prompt cache: a sequence's tokens stay in its cells after its request ends. The next request on
that sequence id keeps the common prefix and evaluates only the rest (`begin`).

Grammars: a request may constrain its tokens with a GBNF grammar from its first token (`begin`)
or from any token on (`constrain`, e.g. once the model opened a tool call). The grammar is the
first link of the sequence's sampler chain, so every token sampled satisfies it; the chain owns
it, and a replaced chain is freed on the engine thread like any other. A grammar llama.cpp cannot
parse raises `GrammarError` and leaves the sequence as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from services.llm.backend import Sampling
from services.llm.backends.llama_model import LlamaModel
from services.runtime.errors import Internal, ResourceExhausted, ServiceError

log = logging.getLogger(__name__)

# Tokens per llama_decode call (llama.cpp's n_batch and n_ubatch).
BATCH_TOKENS = 512
# While other sequences are generating, a prompt is read in pieces of at most this many tokens, so
# that their next token is not held up for a whole long prompt.
PROMPT_PIECE_WHILE_GENERATING = 128
# The scheduler yields to the event loop this many times for the sequences it just served to ask
# for their next token, so that they join the same step (a yield costs microseconds).
_REJOIN_YIELDS = 3
# Tokens of history the repetition penalty looks at.
_PENALTY_LAST_N = 64


def common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    size = min(len(cached), len(prompt))
    if size == 0:
        return 0
    left = np.asarray(cached[:size], dtype=np.intc)
    right = np.asarray(prompt[:size], dtype=np.intc)
    different = np.flatnonzero(left != right)
    return int(different[0]) if len(different) else size


@dataclass(eq=False)
class _SequenceState:
    """What the engine thread keeps for one sequence id."""

    seq_id: int
    # Tokens in this sequence's KV cells, in position order. Replaced, never mutated, so that the
    # event loop may read it (cache affinity) while the engine thread works.
    kv: tuple[int, ...] = ()
    pending: list[int] = field(default_factory=list)  # to evaluate next (prompt, sampled token)
    sampler: Any = None
    sampling: Sampling = field(default_factory=Sampling)  # the request's, to rebuild the chain


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar (its log says why)."""


class BatchEngine:
    """One llama.cpp context with `sequences` sequences, decoded together step by step.

    Args:
        model: The loaded weights, shared by every sequence.
        sequences: Sequence ids (concurrent conversations).
        window: KV cells per sequence (its context window, in tokens).
        threads: CPU threads of the decode.
    """

    def __init__(self, model: LlamaModel, *, sequences: int, window: int, threads: int) -> None:
        self.model = model
        self.sequences = sequences
        self.requested_window = window
        self.threads = threads
        self.window = 0  # cells per sequence, as llama.cpp sized them
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="llama-engine")
        self._states = [_SequenceState(i) for i in range(sequences)]
        self._context: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._demand: dict[int, asyncio.Future[int]] = {}
        self._in_flight: dict[int, asyncio.Future[int]] = {}
        self._rejoining: set[int] = set()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        # Counters for logs, benchmarks and tests.
        self.steps = 0
        self.batched_tokens = 0
        self.widest_step = 0  # most sequences served by one step

    # ---- life cycle (event loop) --------------------------------------------------------------

    async def start(self) -> None:
        """Create the context on the engine thread and start the scheduler."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._create_context)
        self._scheduler = asyncio.create_task(self._schedule(), name="llama-scheduler")

    async def aclose(self) -> None:
        """Stop the scheduler, fail waiting callers, free the context on its thread."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        closed = Internal("the LLM engine was shut down")
        for future in [*self._demand.values(), *self._in_flight.values()]:
            if not future.done():
                future.set_exception(closed)
        self._demand.clear()
        self._in_flight.clear()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._free_context)
        self.executor.shutdown(wait=True)

    def cached_tokens(self, seq_id: int) -> tuple[int, ...]:
        """The tokens in a sequence's KV cells (its prompt cache)."""
        return self._states[seq_id].kv

    # ---- one request on a sequence (event loop) -----------------------------------------------

    async def begin(
        self, seq_id: int, prompt: Sequence[int], sampling: Sampling, grammar: str = ""
    ) -> int:
        """Set up a request on `seq_id`; returns the prompt tokens reused from its KV cells.

        A GBNF `grammar` (root rule `root`) constrains every token from the first.

        Raises:
            GrammarError: llama.cpp cannot parse the grammar.
        """
        if not prompt:
            raise ValueError("an empty prompt has nothing to continue")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._begin, seq_id, list(prompt), sampling, grammar
        )

    async def constrain(self, seq_id: int, grammar: str) -> None:
        """Constrain the tokens `seq_id` samples from now on with a GBNF `grammar`.

        Call it between `next_token` calls of the request that holds the sequence. The grammar
        starts fresh: it sees none of the tokens sampled before.

        Raises:
            GrammarError: llama.cpp cannot parse the grammar; the sampler stays as it was.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._constrain, seq_id, grammar)

    async def next_token(self, seq_id: int) -> int:
        """Evaluate what `seq_id` has pending and sample its next token, batched with others."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._demand[seq_id] = future
        self._rejoining.discard(seq_id)
        self._wake.set()
        try:
            return await future
        finally:
            if self._demand.get(seq_id) is future:
                del self._demand[seq_id]

    async def append(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Add tokens to what `seq_id` evaluates next (e.g. a closing tag the backend forces).

        Call it between `next_token` calls of the request that holds the sequence.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._append, seq_id, list(tokens))

    def end(self, seq_id: int) -> None:
        """The request on `seq_id` is over: leave the batch now, free its sampler after the step.

        Its tokens stay in its cells for the next request's prefix.
        """
        for waiting in (self._demand, self._in_flight):
            future = waiting.pop(seq_id, None)
            if future is not None and not future.done():
                future.cancel()
        self._rejoining.discard(seq_id)
        self.executor.submit(self._end, seq_id)

    # ---- the scheduler (event loop) -----------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._demand:
                self._wake.clear()
                await self._wake.wait()
                continue
            for _ in range(_REJOIN_YIELDS):
                if not self._rejoining:
                    break
                await asyncio.sleep(0)
            self._in_flight, self._demand = self._demand, {}
            self._rejoining = set()
            try:
                tokens = await loop.run_in_executor(
                    self.executor, self._step, list(self._in_flight)
                )
            except Exception as err:  # a failed step fails its requests, never the engine
                self._fail_in_flight(err)
                continue
            for seq_id, future in self._in_flight.items():
                if future.done():
                    continue  # ended while the step ran
                result = tokens.get(seq_id)
                if isinstance(result, ServiceError):
                    future.set_exception(result)
                elif result is not None:
                    future.set_result(result)
                    self._rejoining.add(seq_id)
                else:
                    self._demand[seq_id] = future  # its prompt is still being read
            self._in_flight = {}

    def _fail_in_flight(self, err: Exception) -> None:
        if not isinstance(err, ServiceError):
            log.error("llama.cpp decode step failed", exc_info=err)
            err = Internal("the LLM engine failed to decode; the request was ended")
        for seq_id, future in self._in_flight.items():
            if not future.done():
                future.set_exception(err)
            self.executor.submit(self._forget, seq_id)
        self._in_flight = {}

    # ---- the engine thread --------------------------------------------------------------------

    def _create_context(self) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = self.sequences
        params.n_ctx = self.requested_window * self.sequences
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        # Each sequence gets its own cells and attends only to them: conversations share no
        # prefix worth the cross-sequence masking of a unified cache.
        params.kv_unified = False
        params.no_perf = True
        context = llama_cpp.llama_init_from_model(self.model.pointer, params)
        if not context:
            raise ValueError(
                f"llama.cpp could not create a context of {self.sequences} x "
                f"{self.requested_window} tokens (too little memory?)"
            )
        self._context = context
        self._memory = llama_cpp.llama_get_memory(context)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.window = int(llama_cpp.llama_n_ctx_seq(context))

    def _free_context(self) -> None:
        for state in self._states:
            self._free_sampler(state)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._context is not None:
            llama_cpp.llama_free(self._context)
            self._context = None

    def _begin(self, seq_id: int, prompt: list[int], sampling: Sampling, grammar: str) -> int:
        state = self._states[seq_id]
        sampler = self._sampler(sampling, grammar)  # first: a bad grammar changes nothing
        # At least the last prompt token is evaluated again, for fresh logits.
        reused = min(common_prefix(state.kv, prompt), len(prompt) - 1)
        if reused < len(state.kv) and not llama_cpp.llama_memory_seq_rm(
            self._memory, seq_id, reused, -1
        ):
            # Recurrent state (Mamba layers of hybrid models) cannot be cut back: start over.
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            reused = 0
        state.kv = state.kv[:reused]
        state.pending = prompt[reused:]
        self._free_sampler(state)
        state.sampler, state.sampling = sampler, sampling
        return reused

    def _constrain(self, seq_id: int, grammar: str) -> None:
        state = self._states[seq_id]
        sampler = self._sampler(state.sampling, grammar)
        self._free_sampler(state)
        state.sampler = sampler

    def _append(self, seq_id: int, tokens: list[int]) -> None:
        self._states[seq_id].pending.extend(tokens)

    def _end(self, seq_id: int) -> None:
        state = self._states[seq_id]
        state.pending = []
        self._free_sampler(state)

    def _forget(self, seq_id: int) -> None:
        """After a failed step: the sequence's cells are in doubt, so clear them."""
        state = self._states[seq_id]
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        state.kv = ()
        self._end(seq_id)

    def _step(self, seq_ids: list[int]) -> dict[int, int | ServiceError]:
        """One llama_decode for `seq_ids`.

        Returns the token sampled for each sequence whose pending tokens were all evaluated, and
        an error for one that cannot go on (its window is full); the others read on next step.
        """
        states = sorted((self._states[i] for i in seq_ids), key=lambda s: len(s.pending))
        generating = any(len(state.pending) == 1 for state in states)
        batch = self._batch
        taken: list[tuple[_SequenceState, int]] = []
        outputs: list[tuple[_SequenceState, int]] = []
        count = 0
        refused: dict[int, int | ServiceError] = {}
        for state in states:
            if not state.pending or len(state.kv) + 1 > self.window:
                refused[state.seq_id] = ResourceExhausted(
                    f"the conversation filled its {self.window}-token window"
                    if state.pending
                    else "nothing to evaluate: begin() the request first"
                )
                continue
            room = BATCH_TOKENS - count
            if len(state.pending) > 1 and generating:
                room = min(room, PROMPT_PIECE_WHILE_GENERATING)
            take = min(room, len(state.pending), self.window - len(state.kv))
            if take <= 0:
                continue
            for offset in range(take):
                batch.token[count] = state.pending[offset]
                batch.pos[count] = len(state.kv) + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = state.seq_id
                last = offset == len(state.pending) - 1
                batch.logits[count] = last
                if last:
                    outputs.append((state, count))
                count += 1
            taken.append((state, take))
        if count == 0:
            return refused
        batch.n_tokens = count
        status = llama_cpp.llama_decode(self._context, batch)
        if status != 0:
            # 1: no room in the cache for the batch; < 0: an error (the cache is restored).
            raise Internal(f"llama_decode returned {status} for a batch of {count} tokens")
        self.steps += 1
        self.batched_tokens += count
        self.widest_step = max(self.widest_step, len(taken))
        for state, take in taken:
            state.kv = state.kv + tuple(state.pending[:take])
            state.pending = state.pending[take:]
        sampled = refused
        for state, index in outputs:
            token = int(llama_cpp.llama_sampler_sample(state.sampler, self._context, index))
            state.pending = [token]
            sampled[state.seq_id] = token
        return sampled

    def _sampler(self, sampling: Sampling, grammar: str = "") -> Any:
        links = []
        if grammar:
            # First in the chain: the links after it only choose among the tokens it allows.
            link = llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
            if not link:
                raise GrammarError("llama.cpp could not parse the grammar")
            links.append(link)
        if sampling.repetition_penalty != 1.0:
            links.append(
                llama_cpp.llama_sampler_init_penalties(
                    self.model.n_vocab, _PENALTY_LAST_N, sampling.repetition_penalty, 0.0, 0.0
                )
            )
        if sampling.temperature <= 0:
            links.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.top_k > 0:
                links.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            if sampling.top_p < 1.0:
                links.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed
            links.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            links.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for link in links:
            llama_cpp.llama_sampler_chain_add(chain, link)  # the chain owns it from here
        return chain

    @staticmethod
    def _free_sampler(state: _SequenceState) -> None:
        if state.sampler is not None:
            llama_cpp.llama_sampler_free(state.sampler)
            state.sampler = None
