//! The gRPC door: every Chat and Admin method through the generated tonic client, each
//! error code, health, reflection, and one budget shared with REST.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use step3_gateway::grpc::pb;
use step3_gateway::sim::Fault;
use tonic::Code;

use crate::common::{MODEL, RestApi, TestGateway, chat_body, chat_request};

#[tokio::test]
async fn complete_answers_typed_and_charges_the_same_books_as_rest() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 10})).await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let mut request = chat_request("Describe a bee");
    request.max_tokens = Some(6);
    request.temperature = Some(0.2);
    request.extra = Some(prost_types::Struct {
        fields: [(
            "top_k".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(20.0)),
            },
        )]
        .into(),
    });
    let response = chat.complete(request).await.unwrap();
    assert_eq!(
        response
            .metadata()
            .get("x-quota-remaining-requests")
            .unwrap(),
        "9"
    );
    let answer = response.into_inner();
    assert_eq!(answer.model, MODEL);
    let choice = &answer.choices[0];
    assert_eq!(choice.finish_reason, "length");
    let message = choice.message.as_ref().unwrap();
    assert!(message.reasoning_content.is_some());
    let usage = answer.usage.unwrap();
    assert_eq!(usage.completion_tokens, 6);

    let sent = &gw.sim.simulator.requests()[0];
    assert_eq!(sent.body["top_k"], 20);
    assert_eq!(sent.body["max_tokens"], 6);
    assert!(
        sent.headers["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    assert!(!format!("{:?}", sent.headers).contains(&key.secret));

    let mine = chat
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.requests_used, 1);
    assert_eq!(mine.tokens_used, usage.total_tokens);
    assert_eq!(mine.requests_remaining, Some(9));
    let rest = gw.usage(&key.secret).await;
    assert_eq!(rest["tokens"]["used"], usage.total_tokens);
}

#[tokio::test]
async fn inline_image_bytes_go_upstream_as_a_data_url() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({})).await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let png = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/bee.png"
    ))
    .unwrap();
    let request = pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            parts: vec![
                pb::ContentPart {
                    part: Some(pb::content_part::Part::Image(pb::InlineImage {
                        data: png.clone(),
                        mime_type: "image/png".into(),
                    })),
                },
                pb::ContentPart {
                    part: Some(pb::content_part::Part::Text("What is this?".into())),
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let answer = chat.complete(request).await.unwrap().into_inner();
    assert!(answer.usage.unwrap().prompt_tokens > 256);
    let sent = &gw.sim.simulator.requests()[0];
    let url = sent.body["messages"][0]["content"][0]["image_url"]["url"]
        .as_str()
        .unwrap();
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&png);
    assert_eq!(url, format!("data:image/png;base64,{encoded}"));
}

#[tokio::test]
async fn a_stream_sends_one_message_per_chunk_and_ends_with_finish_reason_and_usage() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.reply_tokens = 5;
            s.reasoning_tokens = 2;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let mut stream = chat
        .stream_complete(chat_request("stream it"))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    // Role chunk, two reasoning tokens, three content tokens, then finish + usage together.
    assert_eq!(chunks.len(), 7, "{chunks:?}");
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c.choices.first()?.reasoning_content.clone())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c.choices.first().map(|d| d.content.clone()))
        .collect();
    assert_eq!(reasoning.split_whitespace().count(), 2);
    assert_eq!(content.split_whitespace().count(), 3);
    let last = chunks.last().unwrap();
    assert_eq!(last.choices[0].finish_reason, "stop");
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens, 5);
    assert!(chunks[..6].iter().all(|c| c.usage.is_none()));
    assert_eq!(gw.usage(&key.secret).await["tokens"]["completion"], 5);
}

#[tokio::test]
async fn models_are_listed_through_the_allowlist() {
    let gw = TestGateway::start().await;
    let open = gw.create_key(json!({})).await;
    let narrow = gw.create_key(json!({"models": ["other"]})).await;
    let models = gw
        .grpc_chat(&open.secret)
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);
    assert_eq!(models.models[0].id, MODEL);
    assert_eq!(models.models[0].max_model_len, Some(65_536));
    let none = gw
        .grpc_chat(&narrow.secret)
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(none.models.is_empty());
}

#[tokio::test]
async fn each_refusal_has_its_grpc_code() {
    let gw = TestGateway::start().await;
    let mut nobody = gw.grpc_chat("sk-step3-nope").await;
    let status = nobody.complete(chat_request("hi")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut anonymous = pb::chat_client::ChatClient::new(gw.channel().await);
    assert_eq!(
        anonymous
            .get_usage(pb::GetUsageRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let narrow = gw.create_key(json!({"models": ["other"]})).await;
    let status = gw
        .grpc_chat(&narrow.secret)
        .await
        .complete(chat_request("hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let limited = gw.create_key(json!({"rpm_limit": 1})).await;
    let mut chat = gw.grpc_chat(&limited.secret).await;
    chat.complete(chat_request("one")).await.unwrap();
    let status = chat.complete(chat_request("two")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry: u64 = status
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(
        status.metadata().get("x-ratelimit-limit-requests").unwrap(),
        "1"
    );

    let spent = gw.create_key(json!({"request_quota": 1})).await;
    let mut chat = gw.grpc_chat(&spent.secret).await;
    chat.complete(chat_request("one")).await.unwrap();
    let status = chat.complete(chat_request("two")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.metadata().get("x-quota-exceeded").unwrap(),
        "requests"
    );

    let key = gw.create_key(json!({})).await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let status = chat
        .complete(pb::ChatRequest {
            model: MODEL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.metadata().get("x-error-param").unwrap(), "messages");
    assert!(status.message().contains("messages"));
    let status = chat
        .complete(pb::ChatRequest {
            model: "no-such-model".into(),
            ..chat_request("hi")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    gw.sim
        .simulator
        .push_fault(Fault::Delay(Duration::from_secs(5)));
    let mut request = tonic::Request::new(chat_request("slow"));
    request.set_timeout(Duration::from_secs(2));
    let status = chat.complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn upstream_failures_are_unavailable_or_deadline_exceeded() {
    let dead = TestGateway::builder()
        .config(|c| c.upstream.url = "http://127.0.0.1:9".into())
        .start()
        .await;
    let key = dead.create_key(json!({})).await;
    let status = dead
        .grpc_chat(&key.secret)
        .await
        .complete(chat_request("hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    let slow = TestGateway::builder()
        .config(|c| c.upstream.first_byte_timeout_secs = 1)
        .start()
        .await;
    let key = slow.create_key(json!({})).await;
    slow.sim
        .simulator
        .push_fault(Fault::Delay(Duration::from_secs(5)));
    let status = slow
        .grpc_chat(&key.secret)
        .await
        .complete(chat_request("hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    // Timed out after the model had it: charged, as an estimate.
    let usage = slow.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 1);
    assert_eq!(usage["tokens"]["completion"], 0);
}

#[tokio::test]
async fn a_cancelled_stream_stops_the_upstream_and_is_charged_what_was_generated() {
    let gw = TestGateway::builder()
        .sim(|s| {
            s.token_latency = Duration::from_millis(30);
            s.reply_tokens = 500;
            s.reasoning_tokens = 0;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    let mut stream = chat
        .stream_complete(chat_request("long"))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..4 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    crate::common::wait_for_cancelled_streams(&gw.sim.simulator, 1).await;
    let stats = gw.sim.simulator.stats();
    assert_eq!(stats.streams_cancelled, 1);
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["outcome"], "client_disconnected");
    let charged = calls[0]["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        charged >= 3 && charged <= stats.completion_tokens_sent,
        "{charged} vs {stats:?}"
    );
}

#[tokio::test]
async fn one_key_has_one_budget_across_rest_and_grpc() {
    let gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"rpm_limit": 3, "request_quota": 100}))
        .await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    assert_eq!(
        gw.chat(&key.secret, &chat_body("rest 1")).await.status(),
        StatusCode::OK
    );
    chat.complete(chat_request("grpc 1")).await.unwrap();
    assert_eq!(
        gw.chat(&key.secret, &chat_body("rest 2")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        chat.complete(chat_request("grpc 2"))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    assert_eq!(
        gw.chat(&key.secret, &chat_body("rest 3")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let usage = chat
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.requests_used, 3);
    assert_eq!(usage.requests_remaining, Some(97));

    let quota = gw.create_key(json!({"request_quota": 2})).await;
    let mut chat = gw.grpc_chat(&quota.secret).await;
    chat.complete(chat_request("grpc")).await.unwrap();
    assert_eq!(
        gw.chat(&quota.secret, &chat_body("rest")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        chat.complete(chat_request("grpc"))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    assert_eq!(
        gw.chat(&quota.secret, &chat_body("rest")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn unknown_grpc_methods_are_unimplemented_and_unknown_rest_paths_json_404() {
    let gw = TestGateway::start().await;
    let mut grpc = tonic::client::Grpc::new(gw.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<pb::GetUsageRequest, pb::KeyUsage>::default();
    let path = "/step3.gateway.v1.Chat/NoSuchMethod".parse().unwrap();
    let status = grpc
        .unary(tonic::Request::new(pb::GetUsageRequest {}), path, codec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    let codec = tonic_prost::ProstCodec::<pb::GetUsageRequest, pb::KeyUsage>::default();
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(pb::GetUsageRequest {}),
            "/other.Service/Call".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    let response = gw.http.get(gw.url("/nothing/here")).send().await.unwrap();
    crate::common::expect_error(response, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn health_follows_the_model_server() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let gw = TestGateway::start().await;
    let mut health = HealthClient::new(gw.channel().await);
    for service in ["", "step3.gateway.v1.Chat", "step3.gateway.v1.Admin"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service}");
    }

    let dead = TestGateway::builder()
        .config(|c| c.upstream.url = "http://127.0.0.1:9".into())
        .start()
        .await;
    let mut health = HealthClient::new(dead.channel().await);
    let check = |service: &'static str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let mut status = ServingStatus::Unknown;
    for _ in 0..100 {
        status = health.check(check("")).await.unwrap().into_inner().status();
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    let chat = health
        .check(check("step3.gateway.v1.Chat"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chat.status(), ServingStatus::NotServing);
    let admin = health
        .check(check("step3.gateway.v1.Admin"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admin.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let gw = TestGateway::start().await;
    let expected = [
        "grpc.health.v1.Health",
        "step3.gateway.v1.Admin",
        "step3.gateway.v1.Chat",
    ];
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(gw.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(futures_util::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for name in expected {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(gw.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "step3.gateway.v1.Chat".into(),
            )),
        };
        let mut answers = client
            .server_reflection_info(futures_util::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.next().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer else {
            panic!("no descriptor: {answer:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

#[tokio::test]
async fn grpc_can_have_a_port_of_its_own() {
    let gw = TestGateway::builder()
        .config(|c| c.server.grpc_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    assert_ne!(gw.running().addr, gw.running().grpc_addr);
    let key = gw.create_key(json!({})).await;
    gw.grpc_chat(&key.secret)
        .await
        .complete(chat_request("hi"))
        .await
        .unwrap();
    // The REST port no longer serves gRPC.
    let channel = tonic::transport::Endpoint::from_shared(gw.running().url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rest_port = pb::chat_client::ChatClient::new(channel);
    assert_eq!(
        rest_port
            .get_usage(pb::GetUsageRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unimplemented
    );
    assert_eq!(
        gw.chat(&key.secret, &chat_body("rest")).await.status(),
        StatusCode::OK
    );
}
