"""Span and attribute names, in one place (servers, bots and trace-report all use these)."""

# Spans of the units of work inside a stream (the RPC itself is traced by the gRPC
# instrumentation, which cannot see time to first byte inside a streamed call).
SPAN_ASR_STREAM = "asr.stream"
SPAN_ASR_UTTERANCE = "asr.utterance"  # first audio of an utterance -> its final transcript
SPAN_ASR_FINALIZE = "asr.finalize"  # finalize received -> final transcript sent
SPAN_TTS_STREAM = "tts.stream"
SPAN_TTS_SEGMENT = "tts.segment"  # text received -> segment_complete sent
SPAN_LLM_REQUEST = "llm.request"  # start received -> done sent (gen_ai "chat")
SPAN_LLM_CHUNK = "llm.chunk"  # generation of one chunk
SPAN_TURN = "turn"  # pipecat's turn span on the bot side
# The bot's client spans, children of the turn, parents of the servers' spans.
SPAN_BOT_STT = "stt"  # finalize sent -> final transcript received
SPAN_BOT_LLM = "llm"  # start sent -> done received
SPAN_BOT_TTS = "tts"  # segment text sent -> segment_complete received

# Attributes (OpenTelemetry semantic conventions where they exist).
ATTR_TTFB_MS = "ttfb_ms"
ATTR_BACKEND = "nemotron.backend"
ATTR_MODEL = "nemotron.model"
ATTR_SESSION_ID = "nemotron.session_id"
ATTR_STREAM_ID = "nemotron.stream_id"
ATTR_SEGMENT_ID = "nemotron.segment_id"
ATTR_UTTERANCE_ID = "nemotron.utterance_id"
ATTR_AUDIO_MS = "nemotron.audio_ms"
ATTR_TEXT_CHARS = "nemotron.text_chars"
ATTR_MODE = "nemotron.tts.mode"
ATTR_FINAL_REASON = "nemotron.asr.final_reason"
ATTR_CHUNK_INDEX = "nemotron.llm.chunk_index"
ATTR_CHUNK_TOKENS = "nemotron.llm.chunk_tokens"
ATTR_CANCELLED = "nemotron.cancelled"
# Content, only when NEMOTRON_TRACE_CONTENT=true.
ATTR_TRANSCRIPT = "nemotron.transcript"
ATTR_TEXT = "nemotron.text"

GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"

# Histograms of the same TTFBs (milliseconds).
METRIC_ASR_TTFB = "nemotron.asr.ttfb"
METRIC_TTS_TTFB = "nemotron.tts.ttfb"
METRIC_LLM_TTFB = "nemotron.llm.ttfb"
#: Gauges of each server's streams (Prometheus: nemotron_streams_active, nemotron_streams_max).
METRIC_STREAMS_ACTIVE = "nemotron.streams.active"
METRIC_STREAMS_MAX = "nemotron.streams.max"

# The bot's reply cut at an interruption (an event on the turn's span).
EVENT_REPLY_CUT = "reply.cut"
ATTR_WORDS_PLAYED = "nemotron.reply.words_played"
ATTR_WORDS_GENERATED = "nemotron.reply.words_generated"
