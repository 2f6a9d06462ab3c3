//! What every handler shares.

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::ModelInfo;

/// Server settings beyond the model.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// Require `Authorization: Bearer <key>` on /v1/ routes, /tokenize and
    /// /detokenize.
    pub api_key: Option<String>,
}

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<dyn Engine>,
    pub info: Arc<ModelInfo>,
    /// The name clients use for the model: its directory or file name.
    pub model_id: String,
    pub options: Arc<ServerOptions>,
    /// When the server started (Unix seconds), the model's `created`.
    pub created: u64,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(engine: Arc<dyn Engine>, info: ModelInfo, options: ServerOptions) -> AppState {
        let model_id = model_id(&info.path);
        AppState {
            engine,
            info: Arc::new(info),
            model_id,
            options: Arc::new(options),
            created: unix_now(),
            metrics: Arc::default(),
        }
    }

    /// A request may name the served model or none.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model_id => Err(ApiError::invalid(format!(
                "the model `{m}` does not exist; this server serves `{}`",
                self.model_id
            ))
            .param("model")
            .code("model_not_found")),
            _ => Ok(()),
        }
    }
}

/// A model's id: the last component of its path (`tiny-qwen3`,
/// `SmolLM2-135M-Instruct.Q4_1.gguf`).
pub fn model_id(path: &std::path::Path) -> String {
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    match path.file_name().or(abs.file_name()) {
        Some(n) => n.to_string_lossy().into_owned(),
        None => path.display().to_string(),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
