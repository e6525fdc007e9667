//! How the simulated server behaves when no fault is queued: served model, pace, lengths.

use std::time::Duration;

/// The model name the simulator serves unless configured otherwise.
pub const DEFAULT_MODEL: &str = "stepfun-ai/Step3-VL-10B";

/// Context window reported by `/v1/models` and enforced on requests (STEP3-VL-10B's).
pub const DEFAULT_MAX_MODEL_LEN: u32 = 65_536;

/// How the simulated backend behaves when no [`Fault`] is queued.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// The served model name; requests naming another model get vLLM's 404.
    pub model: String,
    /// Delay before each streamed token; non-streaming replies wait `n * token_latency`.
    pub token_latency: Duration,
    /// Completion tokens in a reply that `max_tokens` does not cut short.
    pub reply_tokens: u32,
    /// Leading completion tokens emitted as `reasoning_content` (0 disables reasoning).
    pub reasoning_tokens: u32,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` like `vllm serve --api-key`.
    pub api_key: Option<String>,
    /// Context window: prompt plus completion tokens may not exceed it (vLLM's 400).
    pub max_model_len: u32,
    /// Keep every chat request for [`Simulator::requests`]; benchmarks turn this off so
    /// memory stays flat.
    pub record_requests: bool,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_owned(),
            token_latency: Duration::ZERO,
            reply_tokens: 24,
            reasoning_tokens: 4,
            api_key: None,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            record_requests: true,
        }
    }
}
