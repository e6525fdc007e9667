//! Arbitrary upstream answers, stream chunks and model lists read into proto messages.
//!
//! Properties: nothing panics (token counts near `u64::MAX` included); a chunk's
//! `total_tokens` is the sum of its parts (saturating); the finish/usage merger never loses
//! or invents a chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use step3_gateway::grpc::convert::{ChunkMerger, chunk_proto, models_proto, response_proto};
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

    // The bytes as a chunk's data, twice: the second may join the first when it is a
    // usage-only chunk after a finishing one.
    let mut merger = ChunkMerger::default();
    let mut pushed = 0;
    let mut sent = 0;
    for _ in 0..2 {
        if let Ok(chunk) = chunk_proto(data) {
            check_usage(chunk.usage.as_ref());
            pushed += 1;
            sent += merger.push(chunk).len();
        }
    }
    sent += usize::from(merger.finish().is_some());
    // A usage-only chunk joins the held one: at most one fewer message than chunks.
    assert!(sent <= pushed && sent + 1 >= pushed, "{sent} of {pushed}");
});
