//! The emulator's token endpoint (`POST /oauth2/token`): RFC 8693 token
//! exchange, with the user taken from the subject token's user claim, or
//! client credentials with a `user_id` parameter. Client authentication by
//! HTTP Basic (RFC 6749 §2.3.1) or form parameters; tokens expire after the
//! configured lifetime; errors in RFC 6749 §5.2's shape.
//!
//! The subject token's signature is not checked here: the emulator stands
//! behind the gateway, which has already verified it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rand::Rng;
use serde_json::json;
use tokio::time::Instant;

use super::{lock, raw, Dropped, Fault, Reply, State, TokenGrant, MAX_FORM_BYTES};
use crate::token::endpoint::{ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT};

pub(super) async fn handle(state: &State, request: Request<Incoming>) -> Result<Reply, Dropped> {
    if request.method() != Method::POST {
        return Ok(oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        ));
    }
    state.exchanges.fetch_add(1, Ordering::SeqCst);
    let fault = lock(&state.token_fault).clone();
    let mut expires_in = None;
    match fault {
        Fault::None => {}
        Fault::Latency(delay) => tokio::time::sleep(delay).await,
        Fault::Status(status) | Fault::Throttle { status, .. } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(oauth_error(status, "server_error", "injected failure"));
        }
        Fault::HtmlError => {
            return Ok(raw(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/html",
                "<html>down</html>",
            ))
        }
        Fault::GarbageBody => {
            return Ok(raw(
                StatusCode::OK,
                "application/json",
                "{\"token_type\":\"Bearer\"}",
            ))
        }
        Fault::EmptyBody(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            return Ok(raw(status, "application/json", ""));
        }
        Fault::DropConnection => return Err(Dropped),
        Fault::BadExpiry(seconds) => expires_in = Some(seconds),
    }

    let (parts, body) = request.into_parts();
    let Ok(body) = Limited::new(body, MAX_FORM_BYTES).collect().await else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unreadable body",
        ));
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body.to_bytes())
        .into_owned()
        .collect();

    let presented = basic_credentials(&parts.headers).or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let expected = lock(&state.client).clone();
    if presented.is_none() || presented != expected {
        let mut reply = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        reply.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"koodrive\""),
        );
        return Ok(reply);
    }

    let user_id = match form.get("grant_type").map(String::as_str) {
        Some(TOKEN_EXCHANGE_GRANT) => {
            if form.get("subject_token_type").map(String::as_str) != Some(JWT_TOKEN_TYPE) {
                return Ok(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "subject_token_type must be a JWT",
                ));
            }
            let claim = lock(&state.user_claim).clone();
            form.get("subject_token")
                .and_then(|t| user_of_subject_token(t, &claim))
        }
        Some("client_credentials") => form.get("user_id").cloned(),
        _ => {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported grant_type",
            ))
        }
    };
    let Some(user_id) = user_id.filter(|u| !u.is_empty()) else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "no user in the request",
        ));
    };

    let ttl = *lock(&state.token_ttl);
    let token = format!("kd-{:032x}", rand::rng().random::<u128>());
    lock(&state.tokens).insert(
        token.clone(),
        TokenGrant {
            user_id,
            expires_at: Some(Instant::now() + ttl),
        },
    );
    let body = json!({
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": expires_in.unwrap_or(ttl.as_secs() as i64),
    });
    Ok(raw(StatusCode::OK, "application/json", &body.to_string()))
}

/// `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

fn form_decode(value: &str) -> String {
    form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn user_of_subject_token(token: &str, claim: &str) -> Option<String> {
    let data = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token).ok()?;
    data.claims.get(claim)?.as_str().map(str::to_owned)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Reply {
    let body = json!({"error": error, "error_description": description});
    raw(status, "application/json", &body.to_string())
}
