//! Arbitrary upstream answers, stream events and model lists read into proto messages.
//!
//! Properties: nothing panics (token counts near `u64::MAX` included); a chunk's
//! `total_tokens` is the sum of its parts (saturating); `[DONE]` and comments are told
//! apart from chunks; the finish/usage merger never loses or invents a chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use step3_gateway::grpc::convert::{
    ChunkMerger, StreamEvent, models_proto, response_proto, stream_event,
};
use step3_gateway::grpc::pb;

fn check_usage(usage: Option<&pb::Usage>) {
    if let Some(u) = usage {
        assert_eq!(
            u.total_tokens,
            u.prompt_tokens.saturating_add(u.completion_tokens)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(answer) = response_proto(data) {
        check_usage(answer.usage.as_ref());
    }
    if let Ok(list) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = models_proto(&list);
    }

    // The bytes as an event as sent, and as the data of one.
    let mut wrapped = b"data: ".to_vec();
    wrapped.extend_from_slice(data);
    wrapped.extend_from_slice(b"\n\n");
    let mut merger = ChunkMerger::default();
    let mut pushed = 0;
    let mut sent = 0;
    for event in [data, &wrapped[..]] {
        match stream_event(event) {
            Ok(StreamEvent::Chunk(chunk)) => {
                check_usage(chunk.usage.as_ref());
                pushed += 1;
                sent += merger.push(chunk).len();
            }
            Ok(StreamEvent::Done) => {
                assert_eq!(
                    step3_gateway::upstream::sse::event_data(event)
                        .map(|d| d.trim_ascii().to_vec()),
                    Some(b"[DONE]".to_vec())
                );
            }
            Ok(StreamEvent::Nothing) => {
                assert!(step3_gateway::upstream::sse::event_data(event).is_none());
            }
            Ok(StreamEvent::Error(_)) | Err(_) => {}
        }
    }
    sent += usize::from(merger.finish().is_some());
    // A usage-only chunk joins the held one: at most one fewer message than chunks.
    assert!(sent <= pushed && sent + 1 >= pushed, "{sent} of {pushed}");
});
