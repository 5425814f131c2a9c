"""Backend-independent LLM pieces: window fitting, stop strings and the slot pool."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.llm.backend import ChatTurn
from services.llm.context import fit_to_window, generation_reserve
from services.llm.slots import SlotPool
from services.llm.stops import StopMatcher
from services.runtime.errors import InvalidArgument

OVERHEAD = 3  # tokens a fake template adds per message


def encode(messages: tuple[ChatTurn, ...]) -> list[int]:
    """A fake template: 3 tokens per message, then one token per word."""
    tokens: list[int] = []
    for index, message in enumerate(messages):
        tokens += [index] * OVERHEAD + [len(w) for w in message.content.split()]
    return tokens


def turns(*pairs: tuple[str, str]) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(role, content) for role, content in pairs)


SYSTEM = ("system", "be brief")  # 5 tokens
CONVERSATION = turns(
    SYSTEM,
    ("user", "one two three"),  # 6
    ("assistant", "four five six"),  # 6
    ("user", "seven eight"),  # 5
    ("assistant", "nine ten"),  # 5
    ("user", "eleven"),  # 4
)


def test_a_conversation_that_fits_is_kept_whole():
    fitted = fit_to_window(CONVERSATION, encode, budget=31)
    assert fitted.messages == CONVERSATION
    assert fitted.dropped_turns == 0
    assert len(fitted.tokens) == 31


@pytest.mark.parametrize(
    ("budget", "kept"),
    [
        (30, [0, 3, 4, 5]),  # drops the first exchange
        (19, [0, 3, 4, 5]),
        (18, [0, 5]),  # then the second: system prompt and the last user turn
        (9, [0, 5]),
    ],
)
def test_the_oldest_exchanges_go_first_and_the_system_prompt_stays(budget, kept):
    fitted = fit_to_window(CONVERSATION, encode, budget)
    assert fitted.messages == tuple(CONVERSATION[i] for i in kept)
    assert fitted.messages[0].role == "system"
    assert fitted.messages[1].role == "user"
    assert len(fitted.tokens) <= budget
    assert fitted.dropped_turns == kept[1] - 1


def test_without_a_system_prompt_the_latest_turns_stay():
    fitted = fit_to_window(CONVERSATION[1:], encode, budget=10)
    assert fitted.messages == (CONVERSATION[-1],)


def test_when_even_the_last_turn_does_not_fit_the_request_is_invalid():
    with pytest.raises(InvalidArgument) as caught:
        fit_to_window(CONVERSATION, encode, budget=8)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "start.messages"
    assert "9 tokens" in caught.value.message


def test_a_single_turn_that_does_not_fit_is_invalid():
    with pytest.raises(InvalidArgument):
        fit_to_window(turns(SYSTEM, ("user", "a b c d e f g h")), encode, budget=10)


@given(
    st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=12),
    st.booleans(),
    st.integers(min_value=1, max_value=200),
)
def test_fitting_keeps_the_most_turns_that_fit(lengths, with_system, budget):
    messages = [ChatTurn("system", "s")] if with_system else []
    for index, words in enumerate(lengths):
        role = "user" if index % 2 == 0 or index == len(lengths) - 1 else "assistant"
        messages.append(ChatTurn(role, " ".join(["w"] * words)))
    messages[-1] = ChatTurn("user", messages[-1].content)
    try:
        fitted = fit_to_window(messages, encode, budget)
    except InvalidArgument:
        head = messages[:1] if with_system else []
        assert len(encode((*head, messages[-1]))) > budget
        return
    assert len(fitted.tokens) <= budget
    head = tuple(messages[: int(with_system)])
    tail = fitted.messages[len(head) :]
    assert fitted.messages[: len(head)] == head
    start = len(messages) - len(tail)
    assert tuple(messages[start:]) == tail
    assert start == len(head) or messages[start].role == "user"
    # Keeping one more exchange would not fit.
    earlier = [i for i in range(len(head), start) if messages[i].role == "user"]
    if earlier:
        assert len(encode((*head, *messages[earlier[-1] :]))) > budget


def test_the_generation_reserve_is_capped_at_a_quarter_of_the_window():
    assert generation_reserve(8192, 256) == 256
    assert generation_reserve(8192, 8192) == 2048
    assert generation_reserve(2, 100) == 1


# ---- stop strings ---------------------------------------------------------------------------


def run_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    return out, matcher.stopped


def test_a_stop_split_across_tokens_is_found_and_not_sent():
    assert run_stops(["Hello", " wor", "ld. ", "Bye"], ["world"]) == ("Hello ", True)


def test_a_held_prefix_that_is_no_stop_is_sent_later():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == "go "
    assert matcher.push("ART") == "START"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_the_earliest_of_several_stops_wins():
    assert run_stops(["a b c d"], ["c", "b"]) == ("a ", True)


@given(
    st.lists(st.text(max_size=6), max_size=12),
    st.lists(st.text(min_size=1, max_size=4), max_size=3),
)
def test_stops_give_back_the_text_up_to_the_first_stop(pieces, stops):
    text = "".join(pieces)
    out, stopped = run_stops(pieces, stops)
    cuts = [text.find(s) for s in stops if s in text]
    assert stopped == bool(cuts)
    assert out == (text[: min(cuts)] if cuts else text)


# ---- slot pool ------------------------------------------------------------------------------


async def test_a_free_slot_is_chosen_by_its_score():
    pool = SlotPool(["a", "b", "c"])
    async with pool.acquire(lambda slot: {"a": 1, "b": 5, "c": 2}[slot]) as slot:
        assert slot == "b"
        assert pool.free == 2


async def test_waiters_are_served_in_arrival_order_and_cancelled_waiters_skipped():
    pool = SlotPool(["only"])
    order: list[str] = []

    async def user(name: str, hold: asyncio.Event) -> None:
        async with pool.acquire(lambda _: 0):
            order.append(name)
            await hold.wait()

    first_hold, hold = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(user("first", first_hold))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(user(name, hold)) for name in ("second", "third", "fourth")]
    await asyncio.sleep(0)
    assert pool.waiting == 3
    waiters[1].cancel()  # "third" gives up while waiting
    hold.set()
    first_hold.set()
    await asyncio.gather(first, waiters[0], waiters[2])
    assert order == ["first", "second", "fourth"]
    assert pool.free == 1
    assert pool.waiting == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_it_back():
    pool = SlotPool(["only"])
    holder = pool.acquire(lambda _: 0)
    await holder.__aenter__()
    waiter = asyncio.create_task(pool.acquire(lambda _: 0).__aenter__())
    await asyncio.sleep(0)
    await holder.__aexit__(None, None, None)  # hands the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.free == 1
