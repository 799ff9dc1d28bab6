//! Authentication of upgrade requests: [`TokenValidator`] (your check) and [`WsAuth`] (the
//! extractor that runs it).
//!
//! The token is taken from `Authorization: Bearer <token>`, or else from the `token` query
//! parameter (browsers cannot set headers on a WebSocket request). A missing or rejected token
//! answers `401 Unauthorized` before any upgrade happens.
//!
//! ```
//! use async_trait::async_trait;
//! use axum_realtime_kit::auth::{TokenValidator, WsAuth};
//!
//! #[derive(Debug, Clone)]
//! struct User { id: i64 }
//!
//! #[derive(Clone)]
//! struct AppState;
//!
//! #[async_trait]
//! impl TokenValidator for AppState {
//!     type User = User;
//!     type Error = std::io::Error;
//!     async fn validate_token(&self, token: &str) -> Result<User, std::io::Error> {
//!         match token {
//!             "secret-token" => Ok(User { id: 123 }),
//!             _ => Err(std::io::Error::other("invalid token")),
//!         }
//!     }
//! }
//!
//! async fn handler(WsAuth(user): WsAuth<User>) -> String {
//!     format!("hello {}", user.id)
//! }
//! let app: axum::Router = axum::Router::new()
//!     .route("/ws", axum::routing::get(handler))
//!     .with_state(AppState);
//! ```

use async_trait::async_trait;
use axum::extract::{FromRequestParts, Query};
use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// Turns a token into a user. Implement it on the state your router runs with.
#[async_trait]
pub trait TokenValidator {
    /// The authenticated user.
    type User: Send + Sync + 'static;
    /// Why a token was refused (only logged at debug level; the client sees 401).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Validates `token` (without its `Bearer ` prefix).
    async fn validate_token(&self, token: &str) -> Result<Self::User, Self::Error>;
}

/// Extracts and validates the request's token; holds the user. Rejects with 401.
#[derive(Debug)]
pub struct WsAuth<U>(pub U)
where
    U: Send + Sync + 'static;

#[derive(Deserialize)]
struct TokenQuery {
    token: String,
}

impl<S, U> FromRequestParts<S> for WsAuth<U>
where
    S: TokenValidator<User = U> + Send + Sync + 'static,
    U: Send + Sync + 'static,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let token = match bearer_token(&parts.headers) {
            Some(token) => Some(token.to_owned()),
            None => Query::<TokenQuery>::from_request_parts(parts, state)
                .await
                .ok()
                .map(|Query(q)| q.token),
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(unauthorized("missing token"));
        };
        match state.validate_token(&token).await {
            Ok(user) => Ok(WsAuth(user)),
            Err(e) => {
                tracing::debug!(error = %e, "token rejected");
                Err(unauthorized("invalid token"))
            }
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn unauthorized(why: &'static str) -> Response {
    (StatusCode::UNAUTHORIZED, why).into_response()
}
