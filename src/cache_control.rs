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
