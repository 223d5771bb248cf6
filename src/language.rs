//! The `language` request header: validated (a BCP 47-style tag; KooDrive's
//! doc shows both `en-US` and `en_us`) and forwarded, `en-US` when absent.

use http::HeaderMap;

use crate::error::GatewayError;

/// The header name, as KooDrive spells it.
pub(crate) const LANGUAGE: &str = "language";
/// KooDrive's documented default.
pub(crate) const DEFAULT_LANGUAGE: &str = "en-US";
const MAX_LEN: usize = 35;

/// A validated language tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Language(String);

impl Language {
    /// The request's language, or the default when the header is absent.
    pub fn from_headers(headers: &HeaderMap) -> Result<Language, GatewayError> {
        let Some(value) = headers.get(LANGUAGE) else {
            return Ok(Language(DEFAULT_LANGUAGE.to_owned()));
        };
        value
            .to_str()
            .ok()
            .filter(|tag| is_valid(tag))
            .map(|tag| Language(tag.to_owned()))
            .ok_or(GatewayError::InvalidHeader {
                name: LANGUAGE,
                reason: "must be a language tag such as en-US (letters, digits, '-' or '_', at most 35 characters)",
            })
    }

    /// The tag as sent upstream.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A primary subtag of 2–8 letters, then subtags of 1–8 letters or digits
/// separated by `-` or `_`.
fn is_valid(tag: &str) -> bool {
    if tag.is_empty() || tag.len() > MAX_LEN {
        return false;
    }
    let mut subtags = tag.split(['-', '_']);
    let primary = subtags.next().unwrap_or("");
    (2..=8).contains(&primary.len())
        && primary.bytes().all(|b| b.is_ascii_alphabetic())
        && subtags
            .all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(value: &str) -> Result<Language, GatewayError> {
        let mut headers = HeaderMap::new();
        headers.insert(LANGUAGE, HeaderValue::from_str(value).unwrap());
        Language::from_headers(&headers)
    }

    #[test]
    fn absent_header_defaults_to_en_us() {
        assert_eq!(
            Language::from_headers(&HeaderMap::new()).unwrap().as_str(),
            "en-US"
        );
    }

    #[test]
    fn documented_forms_are_accepted() {
        for ok in ["en-US", "en_us", "zh-Hans-CN", "de", "es-419"] {
            assert_eq!(parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn malformed_tags_are_rejected_naming_the_header() {
        for bad in [
            "",
            "e",
            "en--US",
            "en US",
            "en-US;q=1",
            "1234",
            &"a".repeat(36),
            "en-",
        ] {
            match parse(bad) {
                Err(e @ GatewayError::InvalidHeader { .. }) => {
                    assert!(e.render().msg.contains("`language`"))
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn a_language_header_is_kept_verbatim_only_when_it_is_a_short_tag(
            value in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..48),
                "[a-zA-Z]{1,9}([-_][a-zA-Z0-9]{0,9}){0,4}".prop_map(String::into_bytes),
            ],
        ) {
            let Ok(value) = HeaderValue::from_bytes(&value) else {
                return Ok(());
            };
            let mut headers = HeaderMap::new();
            headers.insert(LANGUAGE, value.clone());
            match Language::from_headers(&headers) {
                Ok(language) => {
                    // Safe to forward: visible ASCII, bounded, as sent.
                    prop_assert_eq!(language.as_str().as_bytes(), value.as_bytes());
                    prop_assert!(language.as_str().len() <= MAX_LEN);
                    prop_assert!(language
                        .as_str()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                }
                Err(error) => {
                    let rendered = error.render();
                    prop_assert_eq!(rendered.status.as_u16(), 400);
                    prop_assert!(rendered.msg.contains(LANGUAGE));
                }
            }
        }
    }
}
