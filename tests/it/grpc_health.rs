//! gRPC health `Watch`: one message for the status now, then one per change, however
//! often the gateway re-checks its model servers.

use std::time::Duration;

use step3_gateway::sim::SimulatorConfig;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestGateway, spawn_sim};

#[tokio::test]
async fn health_watch_sends_a_message_only_when_the_status_changes() {
    // A model server of the test's own, to stop halfway; health is checked every 100 ms.
    let sim = spawn_sim(SimulatorConfig::default()).await;
    let url = sim.url();
    let gw = TestGateway::builder()
        .config(move |c| c.upstream.url = url)
        .start()
        .await;
    let mut health = HealthClient::new(gw.channel().await);
    for service in ["", "step3.gateway.v1.Chat"] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        // More than ten checks later, nothing has changed and nothing was sent.
        let quiet = tokio::time::timeout(Duration::from_millis(1500), watch.message()).await;
        assert!(quiet.is_err(), "{service:?}: {quiet:?}");
    }

    let mut watch = health
        .watch(HealthCheckRequest {
            service: "step3.gateway.v1.Chat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    sim.shutdown().await;
    let change = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the change is sent")
        .unwrap()
        .unwrap();
    assert_eq!(change.status(), ServingStatus::NotServing);
    let quiet = tokio::time::timeout(Duration::from_millis(1500), watch.message()).await;
    assert!(quiet.is_err(), "{quiet:?}");
}
