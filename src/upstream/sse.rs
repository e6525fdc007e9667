//! Server-sent events from the upstream: framing into events, and reading the little that
//! metering needs from each (`usage`, whether it carries choices, errors, `[DONE]`).

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::core::records::Usage;

/// Largest event the framer holds while waiting for its end unless configured otherwise
/// (`upstream.max_event_bytes`); real chunks are well under 1 KiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Splits a byte stream into whole events (each ending in a blank line), holding at most
/// `max_event` bytes of an unfinished one. Each byte is scanned for a terminator once, so
/// an event arriving in many small pieces costs linear, not quadratic, time.
pub struct SseFramer {
    buf: BytesMut,
    /// Where the terminator search resumes in `buf`.
    scanned: usize,
    max_event: usize,
}

impl SseFramer {
    pub fn new(max_event: usize) -> Self {
        SseFramer {
            buf: BytesMut::new(),
            scanned: 0,
            max_event,
        }
    }

    /// Adds bytes and returns the events completed by them, each with its terminator.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, OversizedEvent> {
        let mut events = Vec::new();
        self.push_buffered(chunk, &mut events)?;
        Ok(events)
    }

    /// As [`SseFramer::push`], adding the events to `events`; on an error `events` is left
    /// as it was. While no event is half-read (nearly always: upstreams write whole events)
    /// the events are slices of `chunk`, not copies.
    pub fn push_bytes(
        &mut self,
        chunk: Bytes,
        events: &mut Vec<Bytes>,
    ) -> Result<(), OversizedEvent> {
        if !self.buf.is_empty() {
            return self.push_buffered(&chunk, events);
        }
        let before = events.len();
        let mut start = 0;
        while let Some(end) = event_end(&chunk, start) {
            if end - start > self.max_event {
                events.truncate(before);
                return Err(self.oversized());
            }
            events.push(chunk.slice(start..end));
            start = end;
        }
        let rest = &chunk[start..];
        if rest.len() > self.max_event {
            events.truncate(before);
            return Err(self.oversized());
        }
        self.buf.extend_from_slice(rest);
        self.scanned = rest.len().saturating_sub(2);
        Ok(())
    }

    fn push_buffered(
        &mut self,
        chunk: &[u8],
        events: &mut Vec<Bytes>,
    ) -> Result<(), OversizedEvent> {
        let before = events.len();
        self.buf.extend_from_slice(chunk);
        while let Some(end) = event_end(&self.buf, self.scanned) {
            self.scanned = 0;
            let event = self.buf.split_to(end).freeze();
            // An event that arrived whole in one chunk is held to the same limit.
            if event.len() > self.max_event {
                events.truncate(before);
                return Err(self.oversized());
            }
            events.push(event);
        }
        // A terminator is at most three bytes: one may start in the last two and end in
        // the next chunk.
        self.scanned = self.buf.len().saturating_sub(2);
        if self.buf.len() > self.max_event {
            events.truncate(before);
            return Err(self.oversized());
        }
        Ok(())
    }

    fn oversized(&self) -> OversizedEvent {
        OversizedEvent {
            limit: self.max_event,
        }
    }

    /// Bytes of an event that never got its terminator.
    pub fn remainder(&self) -> &[u8] {
        &self.buf
    }
}

impl Default for SseFramer {
    fn default() -> Self {
        SseFramer::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the model server sent a stream event larger than the gateway accepts ({limit} bytes); \
     the stream was cut"
)]
pub struct OversizedEvent {
    pub limit: usize,
}

/// The index just past the first event terminator (`\n\n` or `\n\r\n`) at or after
/// `from` in `buf`. Only line feeds are looked at (with memchr): this runs over every byte
/// the upstream sends.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(at) = memchr::memchr(b'\n', buf.get(i..)?) {
        let lf = i + at;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            Some(_) => i = lf + 1,
            None => return None,
        }
    }
    None
}

/// What one event says, as far as the gate cares.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `data: [DONE]`, the normal end.
    pub done: bool,
    /// Usage so far (cumulative) or final.
    pub usage: Option<Usage>,
    /// `choices` is present and not empty.
    pub has_choices: bool,
    /// An error event: its message.
    pub error: Option<String>,
    /// A `data:` event a client can read: a JSON object or `[DONE]`. Comments, events
    /// without data and data that is not a JSON object are not.
    pub readable: bool,
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    choices: Option<&'a RawValue>,
    /// Read on its own, so that a malformed `usage` does not hide the choices or the error.
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageView {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorView {
    #[serde(default)]
    message: Option<String>,
}

/// The joined `data:` lines of an event (SSE allows several; vLLM sends one).
pub fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    data_of(event).map(Cow::into_owned)
}

/// [`event_data`] borrowed from the event when it has one `data:` line, as vLLM's have.
pub fn data_of(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = Some(event);
    while let Some(text) = rest {
        let line = match memchr::memchr(b'\n', text) {
            Some(lf) => {
                rest = text.get(lf + 1..);
                &text[..lf]
            }
            None => {
                rest = None;
                text
            }
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            match &mut data {
                Some(existing) => {
                    let existing = existing.to_mut();
                    existing.push(b'\n');
                    existing.extend_from_slice(value);
                }
                None => data = Some(Cow::Borrowed(value)),
            }
        }
    }
    data
}

/// Reads an event; comments, unknown lines and unparsable data give an empty `EventInfo`.
pub fn inspect(event: &[u8]) -> EventInfo {
    read_event(event).info
}

/// An event read once: what [`inspect`] says of it, and where its usage sits so that the
/// relay can cut it out without reading the event again.
pub struct ReadEvent<'a> {
    pub info: EventInfo,
    data: Cow<'a, [u8]>,
    /// The span of the `usage` member's value in `data`.
    usage: Option<Range<usize>>,
}

impl ReadEvent<'_> {
    /// Appends the event without its `usage` member to `out`, byte for byte what
    /// [`without_usage`] makes of it; `false` (nothing appended) when there is no usage to
    /// cut. Only for readable events.
    pub fn write_without_usage(&self, out: &mut BytesMut) -> bool {
        match &self.usage {
            Some(span) if self.info.readable => write_cut(&self.data, span.clone(), out),
            _ => false,
        }
    }
}

/// [`inspect`], keeping the data and the usage span. One parse of the data, which is
/// borrowed from the event when it is one line: this runs for every chunk of every stream.
pub fn read_event(event: &[u8]) -> ReadEvent<'_> {
    let Some(data) = data_of(event) else {
        return unreadable(Cow::Borrowed(&[]));
    };
    if data.trim_ascii() == b"[DONE]" {
        return ReadEvent {
            info: EventInfo {
                done: true,
                readable: true,
                ..EventInfo::default()
            },
            data,
            usage: None,
        };
    }
    if !is_object_text(&data) {
        return unreadable(data);
    }
    let Ok(chunk) = serde_json::from_slice::<ChunkView<'_>>(&data) else {
        return unreadable(data);
    };
    let info = EventInfo {
        done: false,
        readable: true,
        usage: chunk
            .usage
            .filter(|raw| is_object(raw.get().as_bytes()))
            .and_then(|raw| serde_json::from_str::<UsageView>(raw.get()).ok())
            .map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            }),
        has_choices: chunk.choices.is_some_and(|c| c.get().trim() != "[]"),
        error: chunk.error.map(error_message),
    };
    let usage = chunk.usage.map(|raw| span_in(&data, raw));
    ReadEvent { info, data, usage }
}

/// A Responses API event (`data: {"type": "response.…", …}`), read for what the gate
/// needs: the final usage (`response.completed`, `.incomplete`, `.failed`), whether it
/// carries generated output (`….delta`), and errors. Its stream has no `[DONE]`: the
/// terminal response event ends it.
pub fn read_response_event(event: &[u8]) -> ReadEvent<'_> {
    #[derive(Deserialize)]
    struct TypedView<'a> {
        #[serde(default, borrow, rename = "type")]
        kind: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        response: Option<ResponseView<'a>>,
        #[serde(default, borrow)]
        message: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct ResponseView<'a> {
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(default, borrow)]
        error: Option<&'a RawValue>,
    }
    let Some(data) = data_of(event) else {
        return unreadable(Cow::Borrowed(&[]));
    };
    if !is_object_text(&data) {
        return unreadable(data);
    }
    let Ok(view) = serde_json::from_slice::<TypedView<'_>>(&data) else {
        return unreadable(data);
    };
    let kind = view.kind.as_deref().unwrap_or_default();
    let (usage, failure) = match view.response {
        Some(response) => (response.usage, response.error.map(error_message)),
        None => (None, None),
    };
    let info = EventInfo {
        readable: true,
        done: matches!(kind, "response.completed" | "response.incomplete"),
        usage,
        has_choices: kind.ends_with(".delta"),
        error: match kind {
            "error" => Some(
                view.message
                    .map_or_else(|| "the model server failed".to_owned(), Cow::into_owned),
            ),
            "response.failed" => {
                Some(failure.unwrap_or_else(|| "the model server failed the response".to_owned()))
            }
            _ => None,
        },
    };
    ReadEvent {
        info,
        data,
        usage: None,
    }
}

/// An event no client could read, with its data.
fn unreadable(data: Cow<'_, [u8]>) -> ReadEvent<'_> {
    ReadEvent {
        info: EventInfo::default(),
        data,
        usage: None,
    }
}

/// Whether `data` is a JSON object in UTF-8 as far as a reader that skips members can
/// tell. Serde skips the members it does not read without checking their strings: data
/// that is not UTF-8 is not JSON, and reading usage from it would bill usage that
/// `without_usage` cannot then remove. (ASCII, the usual case, is checked faster.)
fn is_object_text(data: &[u8]) -> bool {
    is_object(data) && (data.is_ascii() || std::str::from_utf8(data).is_ok())
}

/// An error member's message: `error.message`, else the member as sent.
pub fn error_message(raw: &RawValue) -> String {
    serde_json::from_str::<ErrorView>(raw.get())
        .ok()
        .and_then(|e| e.message)
        .unwrap_or_else(|| raw.get().to_owned())
}

/// Where `raw`, borrowed from `data`, sits in it.
fn span_in(data: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - data.as_ptr() as usize;
    start..start + raw.get().len()
}

/// The event with its `usage` field removed (for clients that did not ask for usage).
///
/// Every chunk carries usage when the upstream streams it continuously, so this runs per
/// chunk: the member is cut out of the bytes where it sits, and only an event too odd for
/// that is re-serialised.
pub fn without_usage(event: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct UsageSpan<'a> {
        #[serde(default, borrow)]
        usage: Option<&'a RawValue>,
    }
    let data = data_of(event)?;
    if !is_object(&data) {
        return None;
    }
    let span = serde_json::from_slice::<UsageSpan<'_>>(&data)
        .ok()?
        .usage
        .map(|raw| span_in(&data, raw))?;
    let mut out = BytesMut::new();
    write_cut(&data, span, &mut out).then(|| out.freeze())
}

/// Appends `data: <data without the member whose value is at value>\n\n` to `out`;
/// `false`, with nothing appended, if the member cannot be removed.
fn write_cut(data: &[u8], value: Range<usize>, out: &mut BytesMut) -> bool {
    let rebuilt;
    let (head, tail) = match cut_member(data, value) {
        Some(parts) => parts,
        None => match reserialized_without_usage(data) {
            Some(kept) => {
                rebuilt = kept;
                (&rebuilt[..], &[][..])
            }
            None => return false,
        },
    };
    out.reserve(head.len() + tail.len() + 8);
    out.extend_from_slice(b"data: ");
    let start = out.len();
    out.extend_from_slice(head);
    out.extend_from_slice(tail);
    // Line breaks in JSON are whitespace between tokens (strings cannot hold them raw), but
    // in SSE they end the `data:` line: as spaces, the data is one line meaning the same.
    let mut from = start;
    while let Some(at) = memchr::memchr2(b'\n', b'\r', &out[from..]) {
        out[from + at] = b' ';
        from += at + 1;
    }
    out.extend_from_slice(b"\n\n");
    true
}

/// Whether `data` starts like a JSON object: serde reads a struct from an array too, and an
/// array chunk is not one the gate understands.
fn is_object(data: &[u8]) -> bool {
    data.trim_ascii_start().starts_with(b"{")
}

/// `data` without the `"usage": <value>` member whose value sits at `value`, and without
/// the comma that joined it to its neighbour, as the parts before and after the cut;
/// `None` if the bytes around it are not the plain `"usage"` key and a colon.
fn cut_member(data: &[u8], value: Range<usize>) -> Option<(&[u8], &[u8])> {
    const KEY: &[u8] = b"\"usage\"";
    let before = data.get(..value.start)?;
    // What separates the key from the value: whitespace and one colon. (Searched from the
    // value back; the key is the last `"usage"` before the value, or there is none.)
    let key_end = before
        .iter()
        .rposition(|&b| b != b':' && !b.is_ascii_whitespace())
        .map_or(0, |last| last + 1);
    let between = &before[key_end..];
    if between.iter().filter(|&&b| b == b':').count() != 1 {
        return None;
    }
    let key = before[..key_end].strip_suffix(KEY)?;
    let head = key.trim_ascii_end();
    let tail = data.get(value.end..)?;
    Some(match head.strip_suffix(b",") {
        Some(head) => (head, tail),
        // The first member: drop the comma after it instead.
        None => (
            head,
            tail.trim_ascii_start().strip_prefix(b",").unwrap_or(tail),
        ),
    })
}

/// `data` rebuilt without `usage`: the other members in order, their values as sent (a
/// `Value` would round numbers and could grow the text), keys re-escaped minimally.
fn reserialized_without_usage(data: &[u8]) -> Option<Vec<u8>> {
    let RawMembers(members) = serde_json::from_slice(data).ok()?;
    let mut out = Vec::with_capacity(data.len());
    out.push(b'{');
    for (key, value) in members.iter().filter(|(key, _)| key != "usage") {
        if out.len() > 1 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).ok()?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.push(b'}');
    Some(out)
}

/// The members of a JSON object in order, values unparsed.
struct RawMembers<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawMembers<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = RawMembers<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(RawMembers(members))
            }
        }
        de.deserialize_map(MembersVisitor)
    }
}

/// The event that ends every stream.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// The error event the gateway sends, before [`DONE_EVENT`], to end a stream it could
/// not finish (the model server broke it off, a limit cut it).
pub fn error_event(code: &str, message: &str) -> Bytes {
    let error = serde_json::json!({
        "error": {"message": message, "type": "upstream_error", "param": null, "code": code}
    });
    Bytes::from(format!("data: {error}\n\n"))
}

/// [`error_event`] in the Responses API's form, which ends its stream (it has no `[DONE]`).
pub fn response_error_event(code: &str, message: &str) -> Bytes {
    let error = serde_json::json!({
        "type": "error", "code": code, "message": message, "param": null
    });
    Bytes::from(format!("event: error\ndata: {error}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn responses_api_events_are_read_for_their_end_output_usage_and_errors() {
        let delta = read_response_event(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n").info;
        assert!(delta.readable && delta.has_choices && !delta.done);
        let completed = read_response_event(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3,\"total_tokens\":10}}}\n\n").info;
        assert!(completed.done);
        assert_eq!(
            completed.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3
            })
        );
        let failed = read_response_event(b"data: {\"type\":\"response.failed\",\"response\":{\"error\":{\"message\":\"boom\"}}}\n\n").info;
        assert_eq!(failed.error.as_deref(), Some("boom"));
        let error = read_response_event(
            b"event: error\ndata: {\"type\":\"error\",\"message\":\"bad\"}\n\n",
        )
        .info;
        assert_eq!(error.error.as_deref(), Some("bad"));
        assert!(!read_response_event(b": ping\n\n").info.readable);
        assert!(!read_response_event(b"data: [1]\n\n").info.readable);
    }

    #[test]
    fn framer_joins_split_events_and_handles_crlf() {
        let mut framer = SseFramer::default();
        assert!(framer.push(b"data: {\"a\"").unwrap().is_empty());
        let events = framer.push(b":1}\n\ndata: [DONE]\r\n\r\ndata: x").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
        assert!(inspect(&events[1]).done);
        assert_eq!(framer.remainder(), b"data: x");
    }

    #[test]
    fn a_terminator_split_between_chunks_is_found() {
        for split in [b"data: {}\n".as_slice(), b"data: {}\n\r", b"data: {}"] {
            let whole = b"data: {}\n\r\ndata: [DONE]\n\n";
            let mut framer = SseFramer::default();
            let mut events = framer.push(split).unwrap();
            events.extend(framer.push(&whole[split.len()..]).unwrap());
            assert_eq!(events.len(), 2, "{split:?}");
            assert!(inspect(&events[1]).done);
        }
    }

    #[test]
    fn an_event_past_the_limit_is_refused_and_nothing_more_is_held() {
        let mut framer = SseFramer::new(4096);
        assert!(framer.push(b"data: {\"x\":\"").unwrap().is_empty());
        let mut refused = false;
        for _ in 0..10 {
            if framer.push(&[b'a'; 1000]).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(framer.remainder().len() <= 4096 + 1000);
    }

    #[test]
    fn junk_is_not_readable() {
        for junk in [
            &b": keep-alive\n\n"[..],
            b"event: ping\n\n",
            b"garbage line\n\n",
            b"data: not json\n\n",
            b"data: [1,2]\n\n",
            b"data: {\"choices\": \n\n",
        ] {
            assert!(!inspect(junk).readable, "{junk:?}");
        }
        assert!(inspect(b"data: {\"choices\":[]}\n\n").readable);
        assert!(inspect(b"data: [DONE]\n\n").readable);
    }

    #[test]
    fn usage_choices_and_errors_are_read() {
        let info = inspect(br#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#);
        assert_eq!(
            info.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        assert!(!info.has_choices);
        let info = inspect(br#"data: {"choices":[{"delta":{"content":"x"}}]}"#);
        assert!(info.has_choices && info.usage.is_none());
        let info = inspect(br#"data: {"error":{"message":"boom","code":500}}"#);
        assert_eq!(info.error.as_deref(), Some("boom"));
        assert_eq!(inspect(b": keep-alive comment\n\n"), EventInfo::default());
        assert_eq!(inspect(b"data: not json\n\n"), EventInfo::default());
    }

    #[test]
    fn usage_is_cut_out_wherever_it_sits() {
        for (event, expected) in [
            (
                &br#"data: {"id":"c","choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#[..],
                r#"{"id":"c","choices":[{"delta":{"content":"x"}}]}"#,
            ),
            (
                &br#"data: {"usage": {"prompt_tokens":1}, "id":"c","choices":[]}"#[..],
                r#"{ "id":"c","choices":[]}"#,
            ),
            (
                &br#"data: {"id":"c" , "usage" : {"prompt_tokens":2} , "choices":[1]}"#[..],
                r#"{"id":"c"  , "choices":[1]}"#,
            ),
        ] {
            let stripped = without_usage(event).unwrap();
            let data = event_data(&stripped).unwrap();
            assert_eq!(std::str::from_utf8(&data).unwrap(), expected);
            let _: serde_json::Value = serde_json::from_slice(&data).unwrap();
        }
        // A key spelled with an escape is still removed, by re-serialising.
        let odd = without_usage(br#"data: {"id":"c","\u0075sage":{"prompt_tokens":1}}"#).unwrap();
        assert!(inspect(&odd).usage.is_none());
    }

    /// Frames `pieces` in order: the events and what is left, or `None` on an error.
    fn frame(pieces: &[&[u8]]) -> Option<(Vec<Bytes>, Vec<u8>)> {
        let mut framer = SseFramer::default();
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(framer.push(piece).ok()?);
        }
        Some((events, framer.remainder().to_vec()))
    }

    /// The checks the gate relies on when it strips usage from an event for a client that
    /// did not ask for it (also run by the `sse_stream` fuzz target).
    fn check_without_usage(event: &[u8]) -> Result<(), TestCaseError> {
        type Members = std::collections::BTreeMap<String, Box<RawValue>>;
        let info = inspect(event);
        let Some(stripped) = without_usage(event) else {
            prop_assert!(info.usage.is_none(), "usage read but not removed");
            return Ok(());
        };
        prop_assert!(stripped.len() <= event.len());
        prop_assert_eq!(
            frame(&[&stripped]),
            Some((vec![stripped.clone()], Vec::new()))
        );
        let before: Members = serde_json::from_slice(&event_data(event).unwrap()).unwrap();
        let after: Members = serde_json::from_slice(&event_data(&stripped).unwrap()).unwrap();
        prop_assert!(!after.contains_key("usage"));
        prop_assert_eq!(
            after.len(),
            before.len() - usize::from(before.contains_key("usage"))
        );
        for (key, value) in &after {
            prop_assert_eq!(before.get(key).map(|v| v.get()), Some(value.get()));
        }
        let info_after = inspect(&stripped);
        prop_assert_eq!(
            (info_after.usage, info_after.has_choices, info_after.error),
            (None, info.has_choices, info.error)
        );
        Ok(())
    }

    /// An event's data: a JSON object with members from a small, awkward set, spread over
    /// several `data:` lines where its whitespace has line breaks.
    fn chunk_event() -> impl Strategy<Value = Vec<u8>> {
        let key = prop::sample::select(
            &[
                "\"id\"",
                "\"choices\"",
                "\"usage\"",
                "\"\\u0075sage\"",
                "\"x\\\"usage\"",
                "\"error\"",
            ][..],
        );
        let value = prop::sample::select(
            &[
                "1",
                "1e5",
                "-0.0",
                "18446744073709551616",
                "\"u\\n\"",
                "[]",
                "[{\"delta\":{}}]",
                "{\"prompt_tokens\":3,\"completion_tokens\":1}",
                "{\"message\":\"boom\"}",
                "null",
            ][..],
        );
        let space = prop::sample::select(&["", " ", "\n", "\r\n", "\n\n"][..]);
        proptest::collection::vec((space.clone(), key, space.clone(), value, space), 0..6).prop_map(
            |members| {
                let mut json = String::from("{");
                for (i, (a, key, b, value, c)) in members.into_iter().enumerate() {
                    if i > 0 {
                        json.push(',');
                    }
                    json.push_str(&format!("{a}{key}{b}:{value}{c}"));
                }
                json.push('}');
                // A blank line would end the event early: keep line breaks single.
                let json = json.replace("\n\n", "\n");
                format!("data: {}\n\n", json.replace('\n', "\ndata: ")).into_bytes()
            },
        )
    }

    /// The readers as they were before they were made cheaper (one parse per event,
    /// borrowed data, memchr), to show the new ones give the same results.
    mod before {
        use super::super::{ChunkView, ErrorView, RawMembers, UsageView, is_object};
        use crate::core::records::Usage;
        use serde::Deserialize;
        use serde_json::value::RawValue;

        use super::EventInfo;

        pub fn event_end(buf: &[u8], from: usize) -> Option<usize> {
            let mut i = from;
            while i + 1 < buf.len() {
                if buf[i] == b'\n' {
                    if buf[i + 1] == b'\n' {
                        return Some(i + 2);
                    }
                    if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                        return Some(i + 3);
                    }
                }
                i += 1;
            }
            None
        }

        pub fn event_data(event: &[u8]) -> Option<Vec<u8>> {
            let mut data: Option<Vec<u8>> = None;
            for line in event.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(value) = line.strip_prefix(b"data:") {
                    let value = value.strip_prefix(b" ").unwrap_or(value);
                    match &mut data {
                        Some(existing) => {
                            existing.push(b'\n');
                            existing.extend_from_slice(value);
                        }
                        None => data = Some(value.to_vec()),
                    }
                }
            }
            data
        }

        pub fn inspect(event: &[u8]) -> EventInfo {
            let Some(data) = event_data(event) else {
                return EventInfo::default();
            };
            if data.trim_ascii() == b"[DONE]" {
                return EventInfo {
                    done: true,
                    readable: true,
                    ..EventInfo::default()
                };
            }
            if !is_object(&data) || std::str::from_utf8(&data).is_err() {
                return EventInfo::default();
            }
            let Ok(chunk) = serde_json::from_slice::<ChunkView<'_>>(&data) else {
                return EventInfo::default();
            };
            EventInfo {
                done: false,
                readable: true,
                usage: chunk
                    .usage
                    .filter(|raw| is_object(raw.get().as_bytes()))
                    .and_then(|raw| serde_json::from_str::<UsageView>(raw.get()).ok())
                    .map(|u| Usage {
                        prompt_tokens: u.prompt_tokens,
                        completion_tokens: u.completion_tokens,
                    }),
                has_choices: chunk.choices.is_some_and(|c| c.get().trim() != "[]"),
                error: chunk.error.map(|raw| {
                    serde_json::from_str::<ErrorView>(raw.get())
                        .ok()
                        .and_then(|e| e.message)
                        .unwrap_or_else(|| raw.get().to_owned())
                }),
            }
        }

        pub fn without_usage(event: &[u8]) -> Option<Vec<u8>> {
            #[derive(Deserialize)]
            struct UsageSpan<'a> {
                #[serde(default, borrow)]
                usage: Option<&'a RawValue>,
            }
            let data = event_data(event)?;
            if !is_object(&data) {
                return None;
            }
            let span = serde_json::from_slice::<UsageSpan<'_>>(&data)
                .ok()?
                .usage
                .map(|raw| {
                    let start = raw.get().as_ptr() as usize - data.as_ptr() as usize;
                    start..start + raw.get().len()
                })?;
            let kept = cut_member(&data, span).map_or_else(|| reserialized(&data), Some)?;
            let mut out = Vec::with_capacity(kept.len() + 8);
            out.extend_from_slice(b"data: ");
            out.extend(
                kept.iter()
                    .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\n\n");
            Some(out)
        }

        fn cut_member(data: &[u8], value: std::ops::Range<usize>) -> Option<Vec<u8>> {
            const KEY: &[u8] = b"\"usage\"";
            let before = data.get(..value.start)?;
            let key = before.windows(KEY.len()).rposition(|w| w == KEY)?;
            let between = before.get(key + KEY.len()..)?;
            if between.iter().filter(|&&b| b == b':').count() != 1
                || !between
                    .iter()
                    .all(|&b| b == b':' || b.is_ascii_whitespace())
            {
                return None;
            }
            let head = before.get(..key)?.trim_ascii_end();
            let tail = data.get(value.end..)?;
            let (head, tail) = match head.strip_suffix(b",") {
                Some(head) => (head, tail),
                None => (
                    head,
                    tail.trim_ascii_start().strip_prefix(b",").unwrap_or(tail),
                ),
            };
            let mut kept = Vec::with_capacity(head.len() + tail.len());
            kept.extend_from_slice(head);
            kept.extend_from_slice(tail);
            Some(kept)
        }

        fn reserialized(data: &[u8]) -> Option<Vec<u8>> {
            let RawMembers(members) = serde_json::from_slice(data).ok()?;
            let mut out = Vec::with_capacity(data.len());
            out.push(b'{');
            for (key, value) in members.iter().filter(|(key, _)| key != "usage") {
                if out.len() > 1 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut out, key).ok()?;
                out.push(b':');
                out.extend_from_slice(value.get().as_bytes());
            }
            out.push(b'}');
            Some(out)
        }
    }

    /// What the relay makes of an event for a client that did not ask for usage, the new
    /// way (one read) and the old (`inspect`, then `without_usage`), must match.
    fn check_same_as_before(event: &[u8]) -> Result<(), TestCaseError> {
        prop_assert_eq!(event_data(event), before::event_data(event));
        let info = inspect(event);
        prop_assert_eq!(&info, &before::inspect(event));
        let stripped = without_usage(event).map(|b| b.to_vec());
        prop_assert_eq!(&stripped, &before::without_usage(event));
        let read = read_event(event);
        prop_assert_eq!(&read.info, &info);
        let mut out = BytesMut::from(&b"x"[..]);
        if read.write_without_usage(&mut out) {
            prop_assert_eq!(Some(&out[1..]), stripped.as_deref());
        } else {
            prop_assert_eq!(&out[..], b"x");
            prop_assert!(!info.readable || stripped.is_none());
        }
        Ok(())
    }

    /// Representative chunks (vLLM's, with and without usage, role, finish, error, usage
    /// only) and odd ones, each also mangled byte by byte.
    #[test]
    fn the_readers_give_what_they_gave_before() {
        let chunks: &[&[u8]] = &[
            br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":16,"total_tokens":16,"completion_tokens":0}}

"#,
            br#"data: {"choices":[{"delta":{"reasoning_content":" me"},"finish_reason":null,"index":0,"logprobs":null,"stop_reason":null}],"created":1795727216,"id":"chatcmpl-25bb","model":"stepfun-ai/Step3-VL-10B","object":"chat.completion.chunk","usage":{"completion_tokens":2,"prompt_tokens":16,"prompt_tokens_details":null,"total_tokens":18}}

"#,
            b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":20,\"prompt_tokens\":16}}\r\n\r\n",
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            b"data: {\"error\":{\"message\":\"boom\",\"code\":500}}\n\n",
            b"data: {\"error\":\"plain\"}\n\n",
            b"data: [DONE]\n\n",
            b"data:[DONE]\r\n\r\n",
            b": keep-alive\n\n",
            b"event: ping\ndata: {\"usage\":{\"prompt_tokens\":1},\"choices\":[1]}\n\n",
            b"data: {\"a\":1,\ndata: \"usage\":{\"completion_tokens\":2},\"choices\":[0]}\n\n",
            b"data: {\"usage\":{\"completion_tokens\":2},\r\ndata: \"choices\":[0]}\r\n\r\n",
            b"data: {\"usage\" :\r{\"prompt_tokens\":1}, \"choices\":[{}]}\n\n",
            b"data: {\"usage\"::{\"prompt_tokens\":1},\"choices\":[{}]}\n\n",
            br#"data: {"\u0075sage":{"prompt_tokens":1},"choices":[{}]}"#,
            br#"data: {"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2},"choices":[{}]}"#,
            br#"data: {"x":"\"usage\":","usage":{"prompt_tokens":1},"choices":[ ]}"#,
            br#"data: {"choices":null,"usage":null,"error":null}"#,
            br#"data: {"usage":[3,4],"choices":[]}"#,
            b"data: {\"id\":\"c\xff\",\"usage\":{\"prompt_tokens\":1}}\n\n",
            b"data: {\"id\":\"\xc3\xa9\",\"usage\":{\"prompt_tokens\":1},\"choices\":[1]}\n\n",
            b"data: \x0c{\"usage\":{\"prompt_tokens\":1},\"choices\":[1]}\n\n",
            b"data: {\"choices\":[1]} x\n\n",
            b"data:\n\n",
            b"data\n\n",
            b"",
        ];
        for chunk in chunks {
            check_same_as_before(chunk).unwrap();
            for at in 0..chunk.len() {
                for byte in [
                    b'"', b'\\', b' ', b'\n', b'\r', b',', b':', b'}', b'0', 0x01,
                ] {
                    let mut changed = chunk.to_vec();
                    changed[at] = byte;
                    check_same_as_before(&changed).unwrap();
                    changed.insert(at, byte);
                    check_same_as_before(&changed).unwrap();
                }
                let mut cut = chunk.to_vec();
                cut.remove(at);
                check_same_as_before(&cut).unwrap();
            }
        }
    }

    proptest! {
        #[test]
        fn framing_does_not_depend_on_chunk_boundaries(
            stream in proptest::collection::vec(
                prop::sample::select(&b"\n\n\r:data {}x"[..]), 0..300),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for cut in cuts {
                pieces.push(&stream[at..cut]);
                at = cut;
            }
            pieces.push(&stream[at..]);
            let whole = frame(&[&stream]).unwrap();
            prop_assert_eq!(frame(&pieces).unwrap(), whole.clone());
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            prop_assert_eq!(frame(&bytes).unwrap(), whole.clone());
            let (events, rest) = whole;
            let mut joined = events.concat();
            joined.extend_from_slice(&rest);
            prop_assert_eq!(joined, stream);
            for event in &events {
                prop_assert!(event.ends_with(b"\n\n") || event.ends_with(b"\n\r\n"));
                prop_assert!(event_end(&event[..event.len() - 1], 0).is_none());
            }
        }

        #[test]
        fn usage_is_removed_keeping_everything_else(event in chunk_event()) {
            check_without_usage(&event)?;
            check_same_as_before(&event)?;
        }

        #[test]
        fn the_readers_agree_with_before_on_any_bytes(
            event in proptest::collection::vec(
                prop::sample::select(&b"\n\r:data [DONE]{}\"usage,1"[..]), 0..120),
        ) {
            check_same_as_before(&event)?;
        }

        /// Framing a chunk in place gives what copying it into the buffer gave, wherever
        /// the chunks are cut.
        #[test]
        fn framing_in_place_is_framing(
            stream in proptest::collection::vec(
                prop::sample::select(&b"\n\n\r:data {}x"[..]), 0..300),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            limit in 1usize..64,
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(stream.len());
            let (mut copied, mut in_place) = (SseFramer::new(limit), SseFramer::new(limit));
            let mut at = 0;
            for cut in cuts {
                let piece = &stream[at..cut];
                at = cut;
                let mut events = vec![Bytes::from_static(b"before")];
                let framed = in_place.push_bytes(Bytes::copy_from_slice(piece), &mut events);
                match copied.push(piece) {
                    Ok(expected) => {
                        prop_assert!(framed.is_ok());
                        prop_assert_eq!(&events[0][..], b"before");
                        prop_assert_eq!(&events[1..], &expected[..]);
                        prop_assert_eq!(in_place.remainder(), copied.remainder());
                    }
                    Err(_) => {
                        prop_assert!(framed.is_err());
                        prop_assert_eq!(events.len(), 1);
                        break;
                    }
                }
            }
            for from in 0..=stream.len() + 1 {
                prop_assert_eq!(event_end(&stream, from), before::event_end(&stream, from));
            }
        }
    }

    /// Found by the `sse_stream` fuzz target: the fallback for an escaped `usage` key went
    /// through `serde_json::Value`, which rewrote numbers (`1e5` became `100000.0`, longer and
    /// no longer what the model server sent).
    #[test]
    fn the_escaped_key_fallback_keeps_values_as_sent() {
        let event: &[u8] =
            br#"data: {"id":"c","\u0075sage":{"prompt_tokens":1},"x":1e5,"big":18446744073709551616}"#;
        let stripped = without_usage(event).unwrap();
        assert_eq!(
            &stripped[..],
            b"data: {\"id\":\"c\",\"x\":1e5,\"big\":18446744073709551616}\n\n"
        );
        assert!(stripped.len() <= event.len());
    }

    /// Data spread over several `data:` lines keeps line breaks between its JSON tokens;
    /// written back on one `data:` line they would have cut the JSON short for the client.
    #[test]
    fn usage_cut_from_multi_line_data_stays_one_data_line() {
        let event = b"data: {\"a\":1,\ndata: \"b\":2,\"usage\":{\"completion_tokens\":2}}\n\n";
        let stripped = without_usage(event).unwrap();
        assert_eq!(&stripped[..], b"data: {\"a\":1, \"b\":2}\n\n");
    }

    /// An array chunk is not a chunk: serde reads the struct from it positionally, so usage
    /// was billed from `[null, {...}]` but could not be cut from it.
    #[test]
    fn array_data_is_not_read_as_a_chunk() {
        let event = br#"data: [null, {"prompt_tokens":5,"completion_tokens":1}]"#;
        assert_eq!(inspect(event), EventInfo::default());
        assert!(without_usage(event).is_none());
    }

    /// Found by `usage_is_removed_keeping_everything_else`: a `usage` that is not a usage
    /// object made the whole chunk unreadable, so its choices and error went unseen.
    #[test]
    fn a_malformed_usage_does_not_hide_the_rest_of_the_chunk() {
        let info = inspect(br#"data: {"usage":1,"error":{"message":"boom"},"choices":[{}]}"#);
        assert_eq!(info.error.as_deref(), Some("boom"));
        assert!(info.has_choices && info.usage.is_none());
        let info = inspect(br#"data: {"usage":[3,4],"choices":[]}"#);
        assert!(info.usage.is_none());
    }

    /// Found by the `sse_stream` fuzz target: with a key spelled with an escape (so the
    /// usage is removed by rebuilding the object) and bytes that are not UTF-8 elsewhere,
    /// `inspect` read the usage but `without_usage` could not remove it.
    #[test]
    fn data_that_is_not_utf8_is_not_read() {
        let event = b"data: {\"id\":\"c\xff\",\"\\u0075sage\":{\"prompt_tokens\":1},\"x\":0e5}\n\n";
        assert_eq!(inspect(event), EventInfo::default());
        assert!(without_usage(event).is_none());
    }

    #[test]
    fn an_oversized_event_is_refused_whole_or_in_pieces() {
        let mut event = b"data: ".to_vec();
        event.resize(DEFAULT_MAX_EVENT_BYTES + 1, b'x');
        event.extend_from_slice(b"\n\n");
        assert!(SseFramer::default().push(&event).is_err());
        let mut framer = SseFramer::default();
        let pushed: Result<Vec<_>, _> = event.chunks(64 * 1024).map(|c| framer.push(c)).collect();
        assert!(pushed.is_err());
    }

    #[test]
    fn usage_can_be_removed_from_an_event() {
        let event = br#"data: {"id":"c","choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}

"#;
        let stripped = without_usage(event).unwrap();
        let info = inspect(&stripped);
        assert!(info.has_choices && info.usage.is_none());
        assert!(stripped.starts_with(b"data: {\"") && stripped.ends_with(b"\n\n"));
    }
}
