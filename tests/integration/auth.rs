//! Inbound JWT verification: every bad token is a normalized 401 and none
//! reaches KooDrive.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::Version;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use koodrive_gateway::devcerts::{DEV_KID, JWKS};
use serde_json::{json, Value};

use crate::support::TestEnv;

const PATH: &str = "/koodrive/ose/v1/jobs?offset=0&limit=1";

/// A P-256 key that is not the gateway's.
fn attacker_key() -> EncodingKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn with_claims(env: &TestEnv, edit: impl FnOnce(&mut Value)) -> String {
    let mut claims = env.claims("u-1");
    edit(&mut claims);
    env.sign(&claims)
}

async fn expect_401(env: &TestEnv, authorization: Option<&str>, code: &str, case: &str) {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| ("authorization", a))
        .into_iter()
        .collect();
    let reply = env
        .send(Version::HTTP_11, "GET", PATH, &headers, None)
        .await;
    assert_eq!(reply.status, 401, "{case}");
    let (got, msg) = reply.error();
    assert_eq!(got, code, "{case}: {msg}");
    let challenge = reply.header("www-authenticate");
    assert!(challenge.starts_with("Bearer"), "{case}");
    if let Some(token) = authorization {
        let token = token.trim_start_matches("Bearer ");
        if token.len() > 8 {
            assert!(
                !String::from_utf8_lossy(&reply.body).contains(token),
                "{case}: token echoed"
            );
        }
    }
}

#[tokio::test]
async fn bad_tokens_are_401_and_never_reach_upstream() {
    let env = TestEnv::start().await;
    let valid = env.token("u-1");
    let mut parts = valid.split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());

    let mut forged_header = Header::new(Algorithm::ES256);
    forged_header.kid = Some(DEV_KID.into());
    let bad_signature =
        jsonwebtoken::encode(&forged_header, &env.claims("u-1"), &attacker_key()).unwrap();

    let mut tampered_claims = env.claims("u-1");
    tampered_claims["koodrive_uid"] = "u-2".into();
    let tampered = format!(
        "{header}.{}.{}",
        b64(&tampered_claims),
        valid.rsplit('.').next().unwrap()
    );

    let alg_none = format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"})));
    let alg_none_kid = format!(
        "{}.{payload}.",
        b64(&json!({"alg": "none", "kid": DEV_KID}))
    );

    // Alg confusion: HS256 keyed with the gateway's public key material.
    let public = std::fs::read(env.certs().join(JWKS)).unwrap();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(DEV_KID.into());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &env.claims("u-1"),
        &EncodingKey::from_secret(&public).unwrap(),
    )
    .unwrap();

    // A token carrying its own key: must not be trusted.
    let attacker = attacker_key();
    let mut embedded = Header::new(Algorithm::ES256);
    embedded.kid = Some(DEV_KID.into());
    embedded.jwk = Some(Jwk::from_encoding_key(&attacker, Algorithm::ES256).unwrap());
    let embedded_jwk = jsonwebtoken::encode(&embedded, &env.claims("u-1"), &attacker).unwrap();

    let mut unknown_kid = Header::new(Algorithm::ES256);
    unknown_kid.kid = Some("someone-elses-key".into());
    let unknown_kid = jsonwebtoken::encode(&unknown_kid, &env.claims("u-1"), &attacker).unwrap();

    let now = jsonwebtoken::get_current_timestamp();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "missing_token"),
        ("empty bearer", Some("Bearer ".into()), "invalid_token"),
        (
            "basic scheme",
            Some(format!("Basic {valid}")),
            "invalid_token",
        ),
        (
            "malformed",
            Some("Bearer not.a.jwt".into()),
            "invalid_token",
        ),
        (
            "two segments",
            Some(format!("Bearer {header}.{payload}")),
            "invalid_token",
        ),
        (
            "bad signature",
            Some(format!("Bearer {bad_signature}")),
            "invalid_token",
        ),
        (
            "tampered payload",
            Some(format!("Bearer {tampered}")),
            "invalid_token",
        ),
        (
            "alg none",
            Some(format!("Bearer {alg_none}")),
            "invalid_token",
        ),
        (
            "alg none with kid",
            Some(format!("Bearer {alg_none_kid}")),
            "invalid_token",
        ),
        (
            "HS256 keyed with the public key",
            Some(format!("Bearer {hs256}")),
            "invalid_token",
        ),
        (
            "embedded jwk",
            Some(format!("Bearer {embedded_jwk}")),
            "invalid_token",
        ),
        (
            "unknown kid",
            Some(format!("Bearer {unknown_kid}")),
            "invalid_token",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["exp"] = (now - 3600).into())
            )),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["nbf"] = (now + 3600).into())
            )),
            "invalid_token",
        ),
        (
            "issued in the future",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["iat"] = (now + 3600).into())
            )),
            "invalid_token",
        ),
        (
            "wrong iss",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["iss"] = "https://evil.example".into())
            )),
            "invalid_token",
        ),
        (
            "wrong aud",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["aud"] = "someone-else".into())
            )),
            "invalid_token",
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| {
                    c.as_object_mut().unwrap().remove("exp");
                })
            )),
            "invalid_token",
        ),
        (
            "no user id claim",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| {
                    c.as_object_mut().unwrap().remove("koodrive_uid");
                })
            )),
            "invalid_token",
        ),
        (
            "user id with a space",
            Some(format!(
                "Bearer {}",
                with_claims(&env, |c| c["koodrive_uid"] = "u 1".into())
            )),
            "invalid_token",
        ),
    ];
    for (case, authorization, code) in &cases {
        expect_401(&env, authorization.as_deref(), code, case).await;
    }
    // An oversized header is a size limit, not a verdict on the token.
    let oversized = format!("Bearer {}", "a".repeat(9 * 1024));
    let reply = env
        .send(
            Version::HTTP_11,
            "GET",
            PATH,
            &[("authorization", &oversized)],
            None,
        )
        .await;
    assert_eq!(reply.status, 431);
    assert_eq!(reply.error().0, "headers_too_large");
    assert!(!reply.headers.contains_key("www-authenticate"));
    assert_eq!(
        env.emulator.jobs_requests(),
        0,
        "a rejected token reached KooDrive"
    );

    // Control: the untouched token works.
    let reply = env.get_bearer(&valid, PATH).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn expired_within_leeway_is_still_accepted() {
    let env = TestEnv::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    let token = with_claims(&env, |c| c["exp"] = (now - 20).into());
    let reply = env
        .send(
            Version::HTTP_2,
            "GET",
            PATH,
            &[("authorization", &format!("Bearer {token}"))],
            None,
        )
        .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn auth_is_checked_before_the_query() {
    let env = TestEnv::start().await;
    let reply = env
        .send(
            Version::HTTP_11,
            "GET",
            "/koodrive/ose/v1/jobs?limit=0",
            &[],
            None,
        )
        .await;
    assert_eq!(reply.status, 401);
}
