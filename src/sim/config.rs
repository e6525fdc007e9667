//! How the simulated server behaves when no fault is queued: served models, pace, lengths.

use std::time::Duration;

/// The model name the simulator serves unless configured otherwise.
pub const DEFAULT_MODEL: &str = "stepfun-ai/Step3-VL-10B";

/// Context window reported by `/v1/models` and enforced on requests (STEP3-VL-10B's).
pub const DEFAULT_MAX_MODEL_LEN: u32 = 65_536;

/// The embedding model to serve next to the chat model, for callers that turn
/// embeddings on (`embedding_model: Some(DEFAULT_EMBEDDING_MODEL.into())`).
///
/// A real, widely deployed embedding model that vLLM serves (STEP3-VL has no embedding
/// sibling), so names, vector length and errors look like a real deployment: its vectors
/// have [`DEFAULT_EMBEDDING_DIMENSIONS`] floats, it takes [`EMBEDDING_MAX_MODEL_LEN`]
/// tokens, and like vLLM for a model without Matryoshka training it refuses `dimensions`.
pub const DEFAULT_EMBEDDING_MODEL: &str = "BAAI/bge-m3";

/// Length of BGE-M3's vectors.
pub const DEFAULT_EMBEDDING_DIMENSIONS: usize = 1024;

/// Context window of the embedding model (BGE-M3's), per input.
pub const EMBEDDING_MAX_MODEL_LEN: u32 = 8192;

/// How the simulated backend behaves when no [`Fault`](crate::sim::Fault) is queued.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// The served chat model: it answers `/v1/chat/completions`, `/v1/completions` and
    /// `/v1/responses`; requests naming a model not served get vLLM's 404.
    pub model: String,
    /// Delay before each streamed token; non-streaming replies wait `n * token_latency`.
    pub token_latency: Duration,
    /// Completion tokens in a text reply that `max_tokens` does not cut short.
    pub reply_tokens: u32,
    /// Leading completion tokens emitted as `reasoning_content` (0 disables reasoning).
    pub reasoning_tokens: u32,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` like `vllm serve --api-key`.
    pub api_key: Option<String>,
    /// Context window: prompt plus completion tokens may not exceed it (vLLM's 400).
    pub max_model_len: u32,
    /// Keep every POST for [`Simulator::requests`](crate::sim::Simulator::requests);
    /// benchmarks turn this off so memory stays flat.
    pub record_requests: bool,
    /// An embedding model answering `/v1/embeddings`, listed in `/v1/models` after the
    /// chat model. `None` (the default) serves no embeddings: one vLLM process serves one
    /// model, so a STEP3-VL server lists that model alone, and the gateway's model-list
    /// tests rely on it.
    pub embedding_model: Option<String>,
    /// Floats per embedding vector.
    pub embedding_dimensions: usize,
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
            embedding_model: None,
            embedding_dimensions: DEFAULT_EMBEDDING_DIMENSIONS,
        }
    }
}
