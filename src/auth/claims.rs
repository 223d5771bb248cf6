//! The verified claim set: a JSON object whose claim names are unique
//! (a token repeating a claim is refused, so no parser ambiguity can choose
//! which value wins — RFC 7519 §4).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, Visitor};
use serde_json::Value;

/// Claims of a verified token, by name.
#[derive(Debug)]
pub(super) struct Claims(BTreeMap<String, Value>);

impl Claims {
    /// A claim's value if it is a string.
    pub(super) fn string(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// Whether `iat` lies further in the future than the leeway allows.
    pub(super) fn issued_in_future(&self, leeway: Duration) -> bool {
        let now = jsonwebtoken::get_current_timestamp();
        match self.0.get("iat") {
            None => false,
            Some(Value::Number(n)) => n
                .as_f64()
                .is_none_or(|iat| iat > (now + leeway.as_secs()) as f64),
            Some(_) => true,
        }
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

    #[test]
    fn iat_in_the_future_beyond_leeway_is_detected() {
        let now = jsonwebtoken::get_current_timestamp();
        let claims: Claims = serde_json::from_value(serde_json::json!({"iat": now + 600})).unwrap();
        assert!(claims.issued_in_future(Duration::from_secs(60)));
        let claims: Claims = serde_json::from_value(serde_json::json!({"iat": now + 30})).unwrap();
        assert!(!claims.issued_in_future(Duration::from_secs(60)));
        let claims: Claims = serde_json::from_value(serde_json::json!({"iat": "soon"})).unwrap();
        assert!(claims.issued_in_future(Duration::from_secs(60)));
    }
}
