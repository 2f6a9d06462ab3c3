//! Request bodies: JSON read into a request type, every failure an
//! [`ApiError`] that names the field at fault (`param`) where there is one.
//! Bodies over [`MAX_BODY`] are refused with 413, before they are read when
//! they declare their length.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;

/// The largest request body accepted: 16 MiB.
pub const MAX_BODY: usize = 16 << 20;

/// A JSON body of type `T` (whatever the `Content-Type`).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(ApiError::too_large(MAX_BODY));
        }
        let body = Bytes::from_request(req, state).await.map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(MAX_BODY),
            _ => ApiError::invalid(format!("reading the request body: {}", r.body_text())),
        })?;
        parse(&body).map(ApiJson)
    }
}

/// `body` as a `T`: malformed JSON, a body that is not an object, a missing
/// field or a field of the wrong type is a 400 saying which.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("the request body is empty; send a JSON object"));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    let err = match serde_path_to_error::deserialize::<_, T>(&v) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let inner = err.inner().to_string();
    let path = err.path().to_string();
    Err(match (path.as_str(), missing_field(&inner)) {
        (".", Some(m)) => ApiError::invalid(inner).param(m),
        (p, Some(m)) => {
            let f = format!("{p}.{m}");
            ApiError::invalid(format!("missing field `{f}`")).param(f)
        }
        (".", None) => match culprit::<T>(&v, &inner) {
            Some(f) => ApiError::invalid(format!("`{f}`: {inner}")).param(f),
            None => ApiError::invalid(format!("the request body: {inner}")),
        },
        (p, None) => ApiError::invalid(format!("`{p}`: {inner}")).param(p),
    })
}

/// The field of serde's "missing field `x`".
fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The top-level field behind `error` when serde lost the path (fields of
/// `#[serde(flatten)]` structs): the first whose removal changes the error
/// into something other than a missing field.
fn culprit<T: DeserializeOwned>(v: &Value, error: &str) -> Option<String> {
    let obj = v.as_object()?;
    obj.keys().find_map(|k| {
        let mut without = obj.clone();
        without.remove(k);
        let e = match T::deserialize(&Value::Object(without)) {
            Ok(_) => return Some(k.clone()),
            Err(e) => e.to_string(),
        };
        (e != error && !e.starts_with("missing field")).then(|| k.clone())
    })
}
