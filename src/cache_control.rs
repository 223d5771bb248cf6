//! `Cache-Control` parsing (RFC 9111 §5.2): the directives of every
//! `Cache-Control` field of a message, names lower-cased, quotes removed.

use http::header::CACHE_CONTROL;
use http::HeaderMap;

/// One directive: its name (lower case) and optional argument.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Directive {
    pub name: String,
    pub value: Option<String>,
}

/// All directives of the message's `Cache-Control` fields, in order.
/// Fields that are not visible ASCII are skipped.
pub(crate) fn directives(headers: &HeaderMap) -> Vec<Directive> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let mut parts = item.splitn(2, '=');
            let name = parts.next()?.trim().to_ascii_lowercase();
            let value = parts.next().map(|v| v.trim().trim_matches('"').to_owned());
            (!name.is_empty()).then_some(Directive { name, value })
        })
        .collect()
}

/// Whether a directive named `name` is present.
pub(crate) fn has(headers: &HeaderMap, name: &str) -> bool {
    directives(headers).iter().any(|d| d.name == name)
}

/// `max-age` in seconds, if present and valid.
pub(crate) fn max_age(headers: &HeaderMap) -> Option<u64> {
    directives(headers)
        .into_iter()
        .find(|d| d.name == "max-age")
        .and_then(|d| d.value?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(CACHE_CONTROL, http::HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn directives_are_collected_across_fields_case_insensitively() {
        let map = headers(&["No-Cache, max-age=60", "private=\"x-user\""]);
        let names: Vec<_> = directives(&map).into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["no-cache", "max-age", "private"]);
        assert!(has(&map, "private"));
        assert!(!has(&map, "no-store"));
        assert_eq!(max_age(&map), Some(60));
    }

    #[test]
    fn bad_max_age_is_ignored() {
        assert_eq!(max_age(&headers(&["max-age=soon"])), None);
        assert_eq!(max_age(&HeaderMap::new()), None);
    }
}

#[cfg(test)]
mod properties {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    /// A directive that is not `no-cache`, as a client might write it.
    fn other_directive() -> impl Strategy<Value = String> {
        "[a-zA-Z-]{1,12}(=[a-z0-9\"]{0,8})?".prop_filter("not no-cache", |d| {
            !d.split('=')
                .next()
                .unwrap_or("")
                .eq_ignore_ascii_case("no-cache")
        })
    }

    fn map(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        headers
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(value in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                let mut headers = HeaderMap::new();
                headers.insert(CACHE_CONTROL, value);
                for directive in directives(&headers) {
                    prop_assert!(!directive.name.is_empty());
                    prop_assert_eq!(directive.name.trim(), directive.name.as_str());
                }
            }
        }

        #[test]
        fn no_cache_is_found_in_any_case_position_and_spacing(
            before in proptest::collection::vec(other_directive(), 0..4),
            after in proptest::collection::vec(other_directive(), 0..4),
            spelled in "(?i)no-cache",
            space in "[ \t]{0,2}",
        ) {
            let mut list = before.clone();
            list.push(format!("{space}{spelled}{space}"));
            list.extend(after.iter().cloned());
            prop_assert!(has(&map(&list.join(",")), "no-cache"));
            // Without it, it is not found.
            let without: Vec<String> = before.into_iter().chain(after).collect();
            prop_assert!(!has(&map(&without.join(", ")), "no-cache"));
        }
    }
}
