//! The verified claim set: a JSON object whose claim names are unique
//! (a token repeating a claim is refused, so no parser ambiguity can choose
//! which value wins — RFC 7519 §4).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{CredentialProblem, GatewayError};

/// Claims of a verified token, by name.
#[derive(Debug)]
pub(super) struct Claims(BTreeMap<String, Value>);

impl Claims {
    /// A claim's value if it is a string.
    pub(super) fn string(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// The time claims, read as jsonwebtoken reads `exp` and `nbf` (a
    /// non-negative number, rounded to whole seconds; `null` = absent).
    /// `iat` is optional but, when present, must be a number.
    pub(super) fn times(&self) -> Result<Times, CredentialProblem> {
        let seconds = |name: &'static str| match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => numeric_date(value)
                .map(Some)
                .ok_or(CredentialProblem::Malformed),
        };
        Ok(Times {
            // Required and checked by jsonwebtoken before this is called.
            exp: seconds("exp")?.ok_or(CredentialProblem::MissingClaim("exp"))?,
            nbf: seconds("nbf")?,
            iat: match self.0.get("iat") {
                None => None,
                Some(Value::Number(n)) => {
                    Some(n.as_f64().ok_or(CredentialProblem::IssuedInFuture)?)
                }
                Some(_) => return Err(CredentialProblem::IssuedInFuture),
            },
        })
    }
}

/// A JSON NumericDate (RFC 7519 §2) as jsonwebtoken takes it: an unsigned
/// integer, or a finite non-negative number rounded to whole seconds.
fn numeric_date(value: &Value) -> Option<u64> {
    let Value::Number(n) = value else {
        return None;
    };
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0 && *v < u64::MAX as f64)
            .map(|v| v.round() as u64)
    })
}

/// The time claims of a token, kept with a cached verification so that
/// every use is checked against the clock by the same rules as the first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Times {
    /// Seconds since the epoch.
    pub(super) exp: u64,
    pub(super) nbf: Option<u64>,
    pub(super) iat: Option<f64>,
}

impl Times {
    /// The token's time rules at `now` (seconds since the epoch), each with
    /// the leeway: refused once `exp` is more than `leeway` in the past (as
    /// jsonwebtoken decides it: `exp < now - leeway`), while `nbf` is more
    /// than `leeway` ahead (`nbf > now + leeway`), or when `iat` is (a
    /// token issued in the future is a forgery or a broken issuer clock).
    /// The same order as the full verification, so both give one error.
    pub(super) fn check(&self, now: u64, leeway: Duration) -> Result<(), GatewayError> {
        let leeway = leeway.as_secs();
        if self.exp < now.saturating_sub(leeway) {
            return Err(GatewayError::ExpiredCredentials);
        }
        let latest = now.saturating_add(leeway);
        if self.nbf.is_some_and(|nbf| nbf > latest) {
            return Err(GatewayError::InvalidCredentials(
                CredentialProblem::NotYetValid,
            ));
        }
        if self.iat.is_some_and(|iat| iat > latest as f64) {
            return Err(GatewayError::InvalidCredentials(
                CredentialProblem::IssuedInFuture,
            ));
        }
        Ok(())
    }

    /// How long a verification may be remembered at `now`: until one
    /// second before `exp + leeway` (whole seconds, so never past the last
    /// instant the token is accepted), at most `cap`; zero when that is
    /// less than a second away.
    pub(super) fn lifetime(&self, now: u64, leeway: Duration, cap: Duration) -> Duration {
        let last = self.exp.saturating_add(leeway.as_secs());
        Duration::from_secs(last.saturating_sub(now).saturating_sub(1)).min(cap)
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UniqueKeys;
        impl<'de> Visitor<'de> for UniqueKeys {
            type Value = Claims;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of claims")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
                let mut claims = BTreeMap::new();
                while let Some((name, value)) = map.next_entry::<String, Value>()? {
                    if claims.contains_key(&name) {
                        return Err(A::Error::custom(format!("duplicate claim `{name}`")));
                    }
                    claims.insert(name, value);
                }
                Ok(Claims(claims))
            }
        }
        deserializer.deserialize_map(UniqueKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_claims_are_refused() {
        let err = serde_json::from_str::<Claims>(r#"{"sub":"a","sub":"b"}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate claim `sub`"));
    }

    fn times(claims: serde_json::Value) -> Result<Times, CredentialProblem> {
        serde_json::from_value::<Claims>(claims).unwrap().times()
    }

    const LEEWAY: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn iat_in_the_future_beyond_leeway_is_detected() {
        let at = |iat: serde_json::Value| {
            times(serde_json::json!({"exp": NOW + 300, "iat": iat})).and_then(|t| {
                match t.check(NOW, LEEWAY) {
                    Err(GatewayError::InvalidCredentials(p)) => Err(p),
                    _ => Ok(()),
                }
            })
        };
        assert_eq!(
            at(serde_json::json!(NOW + 600)),
            Err(CredentialProblem::IssuedInFuture)
        );
        assert_eq!(at(serde_json::json!(NOW + 60)), Ok(()));
        assert_eq!(
            at(serde_json::json!(NOW + 61)),
            Err(CredentialProblem::IssuedInFuture)
        );
        assert_eq!(
            at(serde_json::json!("soon")),
            Err(CredentialProblem::IssuedInFuture)
        );
        assert_eq!(
            at(serde_json::json!(null)),
            Err(CredentialProblem::IssuedInFuture)
        );
    }

    #[test]
    fn exp_is_refused_once_more_than_the_leeway_in_the_past() {
        let t = times(serde_json::json!({"exp": NOW})).unwrap();
        assert!(t.check(NOW + 60, LEEWAY).is_ok());
        assert!(matches!(
            t.check(NOW + 61, LEEWAY),
            Err(GatewayError::ExpiredCredentials)
        ));
    }

    #[test]
    fn nbf_is_refused_while_more_than_the_leeway_ahead() {
        let t = times(serde_json::json!({"exp": NOW + 3600, "nbf": NOW + 60})).unwrap();
        assert!(t.check(NOW, LEEWAY).is_ok());
        assert!(matches!(
            t.check(NOW - 1, LEEWAY),
            Err(GatewayError::InvalidCredentials(
                CredentialProblem::NotYetValid
            ))
        ));
    }

    #[test]
    fn numeric_dates_are_read_as_jsonwebtoken_reads_them() {
        let t = times(serde_json::json!({"exp": 10.6, "nbf": null})).unwrap();
        assert_eq!((t.exp, t.nbf, t.iat), (11, None, None));
        assert!(times(serde_json::json!({"exp": -1})).is_err());
        assert!(times(serde_json::json!({"exp": NOW, "nbf": "later"})).is_err());
        assert_eq!(
            times(serde_json::json!({"nbf": NOW})),
            Err(CredentialProblem::MissingClaim("exp"))
        );
    }

    #[test]
    fn a_verification_is_remembered_until_a_second_before_exp_plus_leeway_at_most_the_cap() {
        let t = times(serde_json::json!({"exp": NOW + 100})).unwrap();
        let cap = Duration::from_secs(3600);
        assert_eq!(t.lifetime(NOW, LEEWAY, cap), Duration::from_secs(159));
        assert_eq!(t.lifetime(NOW + 159, LEEWAY, cap), Duration::ZERO);
        assert_eq!(t.lifetime(NOW + 500, LEEWAY, cap), Duration::ZERO);
        assert_eq!(t.lifetime(0, LEEWAY, cap), cap);
        let far = times(serde_json::json!({"exp": u64::MAX})).unwrap();
        assert_eq!(far.lifetime(NOW, Duration::from_secs(3600), cap), cap);
    }
}
