//! `prepare_chat`, then the rewrites the gateway applies before forwarding (`with_model`,
//! `with_max_tokens`), on arbitrary bodies.
//!
//! Input: one flag byte (continuous usage, which served name, image policy), eight bytes of
//! output cap, then the body. Properties:
//! - nothing panics; a refusal is always `InvalidRequest` (a 400, never a 500);
//! - an accepted body goes upstream as a JSON object: byte-for-byte the client's unless the
//!   stream options had to be set, and then only `stream_options` differs (raw text compared);
//! - `with_model` and `with_max_tokens` change exactly their fields and keep every other
//!   top-level member byte-for-byte;
//! - on a body that was refused, the rewrites may refuse too but what they return is JSON.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use step3_gateway::core::GatewayError;
use step3_gateway::core::request::{RequestOptions, prepare_chat, with_max_tokens, with_model};
use step3_gateway::core::images::ImageUrlPolicy;

const SERVED: [&str; 4] = [
    "stepfun-ai/Step3-VL-10B",
    "",
    "q\"uo\\te\u{1}\u{2028}",
    "ünï",
];

type Members = BTreeMap<String, Box<RawValue>>;

fn members(body: &[u8]) -> Members {
    match serde_json::from_slice(body) {
        Ok(members) => members,
        Err(e) => panic!(
            "not a JSON object ({e}): {:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

/// Every member of `before` not in `changed` is in `after` with the same raw text, and
/// `after` has no member `before` lacks apart from `changed`.
fn only_changed(before: &Members, after: &Members, changed: &[&str]) {
    for (key, value) in before {
        if !changed.contains(&key.as_str()) {
            assert_eq!(
                after.get(key).map(|v| v.get()),
                Some(value.get()),
                "member {key:?} changed"
            );
        }
    }
    for key in after.keys() {
        assert!(
            before.contains_key(key) || changed.contains(&key.as_str()),
            "member {key:?} appeared"
        );
    }
}

fn raw<'a>(members: &'a Members, key: &str) -> Option<&'a str> {
    members.get(key).map(|v| v.get())
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let Some((cap, body)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let cap = u64::from_le_bytes(*cap);
    let continuous = flags & 1 != 0;
    let served = SERVED[usize::from(flags >> 1) % SERVED.len()];
    let mut image_policy = ImageUrlPolicy::default();
    if flags & 8 != 0 {
        image_policy.allow_private_hosts = true;
        image_policy.allowed_schemes.push("file".into());
    }
    let options = RequestOptions {
        continuous_usage: continuous,
        image_policy,
    };
    let body = Bytes::copy_from_slice(body);

    let call = match prepare_chat(body.clone(), &options) {
        Ok(call) => call,
        Err(GatewayError::InvalidRequest { .. }) => {
            // Refused bodies: the rewrites must not panic, and what they return is JSON.
            if let Ok(out) = with_model(&body, served) {
                members(&out);
            }
            if let Ok(out) = with_max_tokens(&body, cap) {
                members(&out);
            }
            return;
        }
        Err(other) => panic!("a body was refused with {other:?}"),
    };
    assert_eq!(call.client_body, body);
    let before = members(&body);
    let sent = members(&call.upstream_body);
    if call.upstream_body == body {
        // Not rewritten: only when usage streams already (or it is no stream at all).
        assert!(
            !call.stream
                || (call.client_wants_usage && (!continuous || call.client_wants_continuous_usage))
        );
    } else {
        assert!(call.stream);
        only_changed(&before, &sent, &["stream_options"]);
        let options: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw(&sent, "stream_options").unwrap_or("null"))
                .expect("stream_options is an object after the rewrite");
        assert_eq!(options.get("include_usage"), Some(&true.into()));
        if continuous {
            assert_eq!(options.get("continuous_usage_stats"), Some(&true.into()));
        }
    }
    assert!(call.choices >= 1);
    assert!(call.image_sizes.len() <= call.images as usize);

    let renamed = with_model(&call.upstream_body, served).expect("an accepted body takes a model");
    let renamed_members = members(&renamed);
    only_changed(&sent, &renamed_members, &["model"]);
    let model: String = serde_json::from_str(raw(&renamed_members, "model").unwrap_or_default())
        .expect("model is a string");
    assert_eq!(model, served);

    let capped = with_max_tokens(&renamed, cap).expect("an accepted body takes a cap");
    let capped_members = members(&capped);
    // Every cap field present is replaced, or `max_tokens` is added when there is none.
    let cap_text = cap.to_string();
    let had_max = renamed_members.contains_key("max_tokens");
    let had_completion = renamed_members.contains_key("max_completion_tokens");
    for (name, expected) in [
        ("max_tokens", had_max || !had_completion),
        ("max_completion_tokens", had_completion),
    ] {
        let expected = expected.then_some(cap_text.as_str());
        assert_eq!(raw(&capped_members, name), expected, "{name}");
    }
    only_changed(
        &renamed_members,
        &capped_members,
        &["max_tokens", "max_completion_tokens"],
    );
    // The gate reads the capped body as the client's with the new name and cap.
    if served.trim().is_empty() {
        return;
    }
    let again = prepare_chat(capped, &options).expect("a rewritten body is still accepted");
    assert_eq!(again.max_tokens, Some(cap));
    assert_eq!(again.model, served);
    assert_eq!(again.stream, call.stream);
    assert_eq!(again.images, call.images);
});
