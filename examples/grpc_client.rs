//! A Rust microservice calling STEP3-VL through the gateway's gRPC `Chat` service.
#![expect(clippy::print_stdout, reason = "an example prints its answers")]
//!
//! ```sh
//! STEP3_GATEWAY_URL=http://localhost:8080 STEP3_API_KEY=sk-step3-... \
//!     cargo run --example grpc_client -- "What is in a honeycomb?"
//! ```

use futures_util::StreamExt;
use step3_gateway::grpc::pb::chat_client::ChatClient;
use step3_gateway::grpc::pb::{ChatRequest, GetUsageRequest, Message};
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("STEP3_GATEWAY_URL").unwrap_or_else(|_| "http://localhost:8080".into());
    let key = std::env::var("STEP3_API_KEY")?;
    let question = std::env::args().nth(1).unwrap_or_else(|| "Hello!".into());

    let channel = Endpoint::from_shared(url)?.connect().await?;
    let bearer: MetadataValue<_> = format!("Bearer {key}").parse()?;
    let mut chat = ChatClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        Ok(request)
    });

    let request = ChatRequest {
        model: "stepfun-ai/Step3-VL-10B".into(),
        messages: vec![Message {
            role: "user".into(),
            text: question,
            ..Default::default()
        }],
        max_tokens: Some(256),
        ..Default::default()
    };

    // One answer.
    let answer = chat.complete(request.clone()).await?.into_inner();
    if let Some(message) = answer.choices.first().and_then(|c| c.message.as_ref()) {
        println!("{}", message.content);
    }

    // The same, streamed: one message per generated chunk, usage on the last.
    let mut stream = chat.stream_complete(request).await?.into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        for choice in &chunk.choices {
            print!("{}", choice.content);
        }
        if let Some(usage) = chunk.usage {
            println!("\n[{} tokens]", usage.total_tokens);
        }
    }

    let usage = chat.get_usage(GetUsageRequest {}).await?.into_inner();
    println!(
        "requests used: {}, remaining: {:?}",
        usage.requests_used, usage.requests_remaining
    );
    Ok(())
}
