//! Scripted misbehaviour: what the next authorised request gets instead of a normal answer.

use std::time::Duration;

/// One scripted behaviour for the next authorised POST request.
///
/// Faults form a FIFO queue; each POST to one of the APIs (`/v1/chat/completions`,
/// `/v1/completions`, `/v1/responses`, `/v1/embeddings`) that passes the API-key check
/// pops one (before its body is validated). With the queue empty the simulator behaves
/// normally. Where a fault speaks of chunks and `[DONE]`, a Responses stream has its
/// own events instead: token chunks are its delta events, its in-stream error is an
/// `event: error`, and it ends with `response.completed`. Embeddings never stream.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Reply with this status and body (`content-type: application/json`).
    Status { status: u16, body: String },
    /// Wait this long before answering normally (slow first byte).
    Delay(Duration),
    /// Abort the connection without sending a status line: the client sees a
    /// connection error, never a response.
    DropConnection,
    /// Streaming only: send this many token chunks, then abort the connection mid-body
    /// (no finish chunk, no usage, no `[DONE]`, no chunked-encoding terminator).
    /// A non-streaming request consumes the fault and is answered normally.
    StreamCutAfter(u32),
    /// Streaming only: after this many token chunks send vLLM's in-stream error event
    /// (`data: {"error":{..., "type":"InternalServerError", "code":500}}`) followed by
    /// `data: [DONE]`, as vLLM does when the engine fails mid-generation.
    /// A non-streaming request consumes the fault and is answered normally.
    StreamErrorAfter(u32),
    /// Streaming only: send this many token chunks, then end the body cleanly without a
    /// finish chunk or `[DONE]` (an upstream that stops early but closes politely).
    /// A non-streaming request consumes the fault and is answered normally.
    StreamEndAfter(u32),
    /// Behave like an upstream without usage support: ignore `stream_options` when
    /// streaming, omit the `usage` field otherwise (`usage: null` in a Responses answer).
    NoUsage,
    /// Reply with exactly this status, `content-type` and body: an HTML error page from a
    /// proxy in front of the model server, or a 200 whose body is not JSON.
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
    /// Streaming: send this many token chunks, then nothing more while keeping the
    /// connection open. Non-streaming: the headers and the first half of the JSON answer,
    /// then nothing more. Either way the body only ends when the client hangs up (then
    /// the stream counts as cancelled) or the simulator stops.
    StreamStallAfter(u32),
    /// Non-streaming only: the headers and this many bytes of the JSON answer, then abort
    /// the connection. A streaming request consumes the fault and is answered normally.
    JsonCutAfter(usize),
    /// Streaming only: after this many token chunks write `raw` into the body verbatim
    /// (junk lines, comments, a `data:` line that is not JSON), then go on normally.
    /// A non-streaming request consumes the fault and is answered normally.
    StreamInject { after: u32, raw: String },
    /// A 200 far larger than any real answer, made as it is sent (chunked, no length):
    /// non-streaming, a JSON answer of this many bytes shaped like the API's; streaming,
    /// the API's opening event (a chat role chunk, `response.created`) and then one token
    /// event of this many bytes that never ends. `u64::MAX` is endless. Bytes handed to
    /// the body count in `SimStats::fault_bytes_sent`.
    Oversized(u64),
    /// A 200 whose body never ends, one byte per interval: non-streaming, a JSON answer;
    /// streaming, the opening event and then a token event that never completes. Bytes
    /// handed to the body count in `SimStats::fault_bytes_sent`.
    Trickle(Duration),
    /// A 502 `text/html` proxy page that never ends, one byte per interval (counted in
    /// `SimStats::fault_bytes_sent`).
    TrickleErrorPage(Duration),
}
