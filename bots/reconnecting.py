"""The one base of the three Pipecat adapters: their channel, their call, its reconnect and backoff.

As Pipecat's `WebsocketService` and livekit-agents' base streams own their connection once, this
owns the adapters' duplex gRPC calls: start/stop/cancel, opening a call, the reader (and, with an
outbox, the writer, joined so that either one's end or failure ends the other), and re-opening
with backoff. Each adapter only says what to send and what to do with what comes back:

- `_new_call(channel)`: the stub method to call;
- `_on_open(call)`: the opening request(s), and the server's handshake if the protocol has one;
- `_on_response(response)`: one message from the server;
- `_on_close()`: the call ended, whichever way; forget what belonged to it;
- `_on_fault(error)`: a non-retryable status, which the adapter may confine (one bad TTS segment).

A call that breaks with UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED or a client-side
deadline is re-opened after a jittered, growing wait (a server that restarts, is busy or
stalled), and so is one the server ends. Any other status ends the session with an ErrorFrame
that marks the adapter unusable (Pipecat's `force_treat_as_permanent`, as `WebsocketService` does
when it gives up), unless the adapter confines it: such a status says the request is wrong, so
dialling again, even after a wait, would repeat the error, or hide a bug, for the whole session.
So does a security mismatch that gRPC reports as UNAVAILABLE (a plaintext adapter meeting a TLS
server): `clients.security.diagnose` tells it from a server that is down, and the ErrorFrame
says what to set instead of retrying for ever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, ClassVar, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from loguru import logger
from pipecat.frames.frames import CancelFrame, EndFrame, StartFrame
from pipecat.services.ai_service import AIService

from bots.grpc_client import Backoff, describe, is_retryable, open_channel
from clients.security import ClientSecurity, diagnose

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


class GrpcCallService(AIService, Generic[RequestT, ResponseT]):
    """A Pipecat service that talks to one mesh server over a duplex gRPC call.

    With `keep_open` (the ASR and TTS adapters) the call is opened at pipeline start and held
    open for the session, re-opened with backoff whenever it breaks. Without it (the LLM adapter,
    one call per response) the adapter runs `_run_call()` itself, and a broken call ends that
    response with an error: a retried generation would repeat what the listener already heard.

    Args:
        target: The server, e.g. "127.0.0.1:8080".
        security: TLS and token of the channel; None reads them from the environment
            (NEMOTRON_TLS_CA, NEMOTRON_TOKEN_FILE, ...) when the pipeline starts.
        outbox_size: Requests queued for the writer task while the server is slow (0: no outbox;
            the adapter writes with `_send`). Beyond it the oldest `_droppable` request is lost.
        response_timeout_s: Longest wait for each message from the server (None: no limit).
        **kwargs: Passed to the Pipecat service class.
    """

    #: Names the server in logs and errors ("ASR", "TTS", "LLM").
    label: ClassVar[str] = "gRPC"
    #: Hold one call open for the session (else the adapter runs one call per unit of work).
    keep_open: ClassVar[bool] = True

    def __init__(
        self,
        *,
        target: str,
        security: ClientSecurity | None = None,
        outbox_size: int = 0,
        response_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.security = security
        self.response_timeout_s = response_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._connected = asyncio.Event()
        self._session: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self._writing = asyncio.Lock()
        self._outbox_size = outbox_size
        self._outbox: deque[RequestT] = deque()
        self._outbox_ready = asyncio.Event()

    @property
    def connected(self) -> bool:
        """Whether a call is open (its handshake done) and takes requests."""
        return self._connected.is_set()

    # ---- what each adapter says ----------------------------------------------------------------

    def _new_call(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        """Start the call (the stub method, with its metadata)."""
        raise NotImplementedError

    async def _on_open(self, call: grpc.aio.StreamStreamCall) -> bool:
        """Send the opening request(s) and wait for the handshake, if any (read with `_read`).

        Only this writes on the call until it returns. Returns False when the server ended the
        call first; an error or deadline raised here counts as the call breaking.
        """
        return True

    async def _on_response(self, response: ResponseT) -> bool:
        """Act on one message from the server; True when the call's work is done (end it)."""
        raise NotImplementedError

    async def _on_close(self) -> None:
        """The call ended (by the server, an error, a deadline or a cancel): reset its state."""

    async def _on_fault(self, error: grpc.aio.AioRpcError) -> bool:
        """A non-retryable status ended the call: True if the adapter confined it (re-open).

        False, the default, ends the session with an ErrorFrame.
        """
        return False

    def _droppable(self, request: RequestT) -> bool:
        """Whether a queued request may be dropped when the outbox is full."""
        return True

    # ---- Pipecat lifecycle ---------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        """Open the channel and, with `keep_open`, the session's call."""
        await super().start(frame)
        self.security = self.security or ClientSecurity.from_env()
        self._channel = open_channel(self.target, self.security)
        if self.keep_open:
            self._session = self.create_task(
                self._keep_call(), f"grpc-{self.label.lower()}-session"
            )

    async def stop(self, frame: EndFrame) -> None:
        """Close the call and the channel."""
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        """Close the call and the channel at once."""
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        if self._session is not None:
            await self.cancel_task(self._session)
            self._session = None
        if self._call is not None:
            self._call.cancel()  # a per-response call still running
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._connected.clear()

    # ---- sending -------------------------------------------------------------------------------

    async def _send(self, request: RequestT) -> bool:
        """Write `request` on the open call; False (nothing sent) when none is open or it broke.

        A broken call is noticed, and re-opened, by the reader; the adapter re-sends what it
        must from `_on_open`.
        """
        call = self._call
        if call is None or not self.connected:
            return False
        try:
            async with self._writing:
                await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            logger.debug(f"{self}: not sent on the {self.label} call: {error}")
            return False
        return True

    def _offer(self, request: RequestT) -> None:
        """Queue `request` for the writer task; a full outbox loses its oldest droppable one."""
        if len(self._outbox) >= self._outbox_size:
            victim = next((queued for queued in self._outbox if self._droppable(queued)), None)
            if victim is not None:
                self._outbox.remove(victim)
            elif self._droppable(request):
                return
            else:
                logger.warning(f"{self}: {self.label} outbox full of control messages")
                self._outbox.popleft()
        self._outbox.append(request)
        self._outbox_ready.set()

    # ---- the call ------------------------------------------------------------------------------

    async def _keep_call(self) -> None:
        """Hold a call open; re-open it with backoff when it ends, until a fault ends it all."""
        while True:
            try:
                await self._run_call()
                logger.info(f"{self}: the {self.label} server ended the call; re-opening")
            except Exception as error:
                if not await self._reopens_after(error):
                    return
            await asyncio.sleep(self._backoff.next_delay())

    async def _reopens_after(self, error: Exception) -> bool:
        assert self.security is not None
        reason = await diagnose(error, self.target, self.security)
        if reason and not self.security.uses_tls:  # a TLS server: plaintext never gets through
            await self.push_error(
                f"{self.label} call failed: {describe(error)}; {reason}",
                force_treat_as_permanent=True,
            )
            return False
        if is_retryable(error):
            hint = f" ({reason})" if reason else ""  # e.g. mutual TLS refused our certificate
            logger.warning(
                f"{self}: {self.label} at {self.target}: {describe(error)}{hint}; retrying"
            )
            return True
        if isinstance(error, grpc.aio.AioRpcError):
            if await self._on_fault(error):
                return True
        else:
            logger.opt(exception=error).error(f"{self}: unexpected error in the {self.label} call")
        await self.push_error(
            f"{self.label} call failed: {describe(error)}", force_treat_as_permanent=True
        )
        return False

    async def _run_call(self) -> None:
        """One call: open it, run its handshake, then read (and write) until it ends.

        Returns when the server ends the call or `_on_response` says its work is done; raises
        what broke it. Whichever way it ends, the call is cancelled, its tasks awaited and
        `_on_close` run before this returns.
        """
        assert self._channel is not None
        call = self._new_call(self._channel)
        self._call = call
        opened = False
        try:
            if not await self._on_open(call):
                return
            opened = True
            self._outbox.clear()  # requests from before this call belong to no stream now
            self._connected.set()
            await self._call_event_handler("on_connected")
            if self._outbox_size:
                await _joined(self._read_all(call), self._write_all(call))
            else:
                await self._read_all(call)
        finally:
            self._connected.clear()
            self._call = None
            call.cancel()  # no-op after a clean end; frees the server's resources otherwise
            if opened:
                await self._call_event_handler("on_disconnected")
            await self._on_close()

    async def _read(self, call: grpc.aio.StreamStreamCall, timeout_s: float | None) -> Any:
        """The next message (or `grpc.aio.EOF`) within `timeout_s`; any answer resets backoff."""
        response = await asyncio.wait_for(call.read(), timeout_s)
        if response is not grpc.aio.EOF:
            self._backoff.reset()
        return response

    async def _read_all(self, call: grpc.aio.StreamStreamCall) -> None:
        while (response := await self._read(call, self.response_timeout_s)) is not grpc.aio.EOF:
            if await self._on_response(response):
                return

    async def _write_all(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            request = self._outbox.popleft()
            async with self._writing:
                await call.write(request)


async def _joined(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the call's reader and writer; the first to end or fail ends the other.

    Both tasks are awaited before this returns, on every path (including our own cancellation);
    the first failure, if any, is raised.
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    # Every outcome is retrieved (no "never retrieved" warnings); the first task to end decides.
    outcomes = {task: None if task.cancelled() else task.exception() for task in tasks}
    first = next((outcomes[task] for task in done if outcomes[task] is not None), None)
    if first is not None:
        raise first
