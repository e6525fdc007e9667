//! The SSE framer, `inspect` and `without_usage` on arbitrary upstream bytes split at
//! arbitrary points.
//!
//! Input: one byte `k`, then `k % 16` little-endian u16 chunk lengths, then the stream.
//! Properties:
//! - framing does not depend on how the bytes were split (same events, same remainder);
//! - the events and the remainder are the stream, in order, byte for byte; each event ends
//!   at its first terminator;
//! - `without_usage` returns one well-formed event, never longer than the input, whose data
//!   is a JSON object with every member but `usage` kept byte-for-byte; what `inspect` reads
//!   from it is what it read before, minus the usage; and whenever `inspect` saw usage,
//!   `without_usage` removes it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use step3_gateway::upstream::sse::{SseFramer, event_data, inspect, without_usage};

type Members = BTreeMap<String, Box<RawValue>>;

fn frame(pieces: &[&[u8]]) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut framer = SseFramer::default();
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(framer.push(piece).ok()?.into_iter().map(|e| e.to_vec()));
    }
    Some((framer.remainder().to_vec(), events))
}

fn check_event(event: &[u8]) {
    let info = inspect(event);
    let Some(stripped) = without_usage(event) else {
        assert!(info.usage.is_none(), "usage was read but not removed");
        return;
    };
    assert!(
        stripped.len() <= event.len(),
        "without_usage grew the event: {:?} -> {:?}",
        String::from_utf8_lossy(event),
        String::from_utf8_lossy(&stripped)
    );
    // One whole event, nothing left over.
    let (rest, events) = frame(&[&stripped]).expect("small event");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&stripped));
    assert_eq!(events, [stripped.to_vec()]);

    // Bytes the JSON reader skips are not checked for UTF-8: such data was not JSON to begin
    // with, and is passed on as it came (the checks above still hold).
    let data = event_data(event).expect("had data");
    let Ok(before) = serde_json::from_slice::<Members>(&data) else {
        assert!(
            std::str::from_utf8(&data).is_err(),
            "usage was cut from a non-object"
        );
        return;
    };
    let after: Members = serde_json::from_slice(&event_data(&stripped).expect("has data"))
        .expect("without_usage keeps a JSON object");
    assert!(!after.contains_key("usage"));
    // Line breaks (JSON whitespace) become spaces so that the data stays one `data:` line.
    let spaced = |raw: &str| raw.replace(['\r', '\n'], " ");
    for (key, value) in &before {
        if key != "usage" {
            assert_eq!(
                after.get(key).map(|v| spaced(v.get())),
                Some(spaced(value.get())),
                "{key:?} changed"
            );
        }
    }
    assert!(after.keys().all(|k| before.contains_key(k)));

    let info_after = inspect(&stripped);
    assert!(info_after.usage.is_none());
    assert_eq!(info_after.has_choices, info.has_choices);
    assert_eq!(info_after.error, info.error);
    assert_eq!(info_after.done, info.done);
}

fuzz_target!(|input: &[u8]| {
    let Some((&k, rest)) = input.split_first() else {
        return;
    };
    let k = usize::from(k % 16);
    let Some(lengths) = rest.get(..2 * k) else {
        return;
    };
    let stream = &rest[2 * k..];
    let mut pieces = Vec::new();
    let mut at = 0;
    for length in lengths.chunks_exact(2) {
        let length = usize::from(u16::from_le_bytes([length[0], length[1]])) % (stream.len() + 1);
        let end = (at + length).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
    }
    pieces.push(&stream[at..]);

    let whole = frame(&[stream]);
    let split = frame(&pieces);
    let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
    let byte_by_byte = frame(&bytewise);
    assert_eq!(whole, split, "framing depends on the split");
    assert_eq!(whole, byte_by_byte, "framing depends on the split");
    let Some((remainder, events)) = whole else {
        return;
    };
    let mut joined: Vec<u8> = events.concat();
    joined.extend_from_slice(&remainder);
    assert_eq!(joined, stream);
    for event in &events {
        assert!(event.ends_with(b"\n\n") || event.ends_with(b"\n\r\n"));
        // The first terminator ends the event: none before its last byte.
        let (rest, inner) = frame(&[&event[..event.len() - 1]]).expect("small");
        assert!(inner.is_empty());
        assert_eq!(rest, event[..event.len() - 1]);
        check_event(event);
    }
    // The remainder is what a stream cut short leaves: it is read too.
    check_event(&remainder);
});
