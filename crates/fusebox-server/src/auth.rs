//! `--api-key`: requests to /v1/, /tokenize and /detokenize need
//! `Authorization: Bearer <key>` (/health and /metrics do not).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::state::AppState;

/// Middleware: a missing or wrong key is a 401 (`invalid_api_key`).
pub async fn require_key(State(st): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    if let Some(key) = &st.options.api_key {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        let token = given
            .and_then(bearer)
            .ok_or_else(|| ApiError::unauthorized("no API key: send `Authorization: Bearer KEY`"))?;
        if !same_key(token, key.as_bytes()) {
            return Err(ApiError::unauthorized("incorrect API key"));
        }
    }
    Ok(next.run(req).await)
}

/// The token of a `Bearer` authorization value (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

/// Whether `given` equals `key`, in a time that depends on `key`'s length
/// only (not on where they differ).
pub fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for (i, &k) in key.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(!k) ^ k);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::{bearer, same_key};

    #[test]
    fn keys_compare() {
        assert!(same_key(b"sekret", b"sekret"));
        assert!(!same_key(b"sekreT", b"sekret"));
        assert!(!same_key(b"sekret2", b"sekret"));
        assert!(!same_key(b"sek", b"sekret"));
        assert!(!same_key(b"", b"sekret"));
        assert_eq!(bearer(b"Bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }
}
