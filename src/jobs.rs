//! The jobs schema: strict parse of the inbound query of
//! `GET /koodrive/ose/v1/jobs` into a typed [`JobsQuery`], and its canonical
//! form for the upstream. The "validate" step of the flow.

use std::fmt;

/// The path the gateway serves (and forwards to).
pub(crate) const JOBS_PATH: &str = "/koodrive/ose/v1/jobs";

/// Longest accepted value, checked before any number is parsed. Leading
/// zeros are allowed, so this is longer than `i64::MAX` has digits.
const MAX_VALUE_LEN: usize = 32;

/// A validated request for the batch-task list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobsQuery {
    /// Data query offset, `0..=i64::MAX`.
    pub offset: u64,
    /// Page size, `1..=100`.
    pub limit: u8,
    /// Job type, `1..=7`.
    pub job_type: Option<u8>,
    /// Job status, `0..=3`.
    pub status: Option<u8>,
}

/// Why a query was rejected; every variant names the parameter.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A required parameter is absent.
    #[error("missing required parameter `{0}`")]
    Missing(&'static str),
    /// A parameter the API does not define.
    #[error("unknown parameter `{0}`")]
    Unknown(String),
    /// A parameter given more than once.
    #[error("parameter `{0}` is given more than once")]
    Repeated(&'static str),
    /// A value that breaks the parameter's rule.
    #[error("parameter `{name}` {rule}")]
    Invalid {
        name: &'static str,
        rule: &'static str,
    },
}

impl QueryError {
    /// The client-facing error code.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Missing(_) => "missing_parameter",
            QueryError::Unknown(_) => "unknown_parameter",
            QueryError::Repeated(_) => "repeated_parameter",
            QueryError::Invalid { .. } => "invalid_parameter",
        }
    }
}

/// One parameter of the schema: its name, range and rule text.
struct Param {
    name: &'static str,
    min: u64,
    max: u64,
    rule: &'static str,
}

const OFFSET: Param = Param {
    name: "offset",
    min: 0,
    max: i64::MAX as u64,
    rule: "must be a decimal integer from 0 to 9223372036854775807",
};
const LIMIT: Param = Param {
    name: "limit",
    min: 1,
    max: 100,
    rule: "must be a decimal integer from 1 to 100",
};
const TYPE: Param = Param {
    name: "type",
    min: 1,
    max: 7,
    rule: "must be a decimal integer from 1 to 7",
};
const STATUS: Param = Param {
    name: "status",
    min: 0,
    max: 3,
    rule: "must be a decimal integer from 0 to 3",
};

impl Param {
    /// Parses one value: ASCII digits only (no sign, space, exponent, hex
    /// or non-ASCII digit), bounded length, then the range.
    fn parse(&self, value: &str) -> Result<u64, QueryError> {
        let invalid = QueryError::Invalid {
            name: self.name,
            rule: self.rule,
        };
        if value.is_empty()
            || value.len() > MAX_VALUE_LEN
            || !value.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(invalid);
        }
        // At most 32 digits: u128 cannot overflow.
        let number: u128 = value.parse().map_err(|_| invalid.clone())?;
        u64::try_from(number)
            .ok()
            .filter(|n| (self.min..=self.max).contains(n))
            .ok_or(invalid)
    }
}

impl JobsQuery {
    /// Parses the raw query string (without `?`) strictly per DESIGN.md.
    pub fn parse(raw: Option<&str>) -> Result<JobsQuery, QueryError> {
        let mut offset = None;
        let mut limit = None;
        let mut job_type = None;
        let mut status = None;
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let (param, slot) = match name.as_ref() {
                "offset" => (&OFFSET, &mut offset),
                "limit" => (&LIMIT, &mut limit),
                "type" => (&TYPE, &mut job_type),
                "status" => (&STATUS, &mut status),
                other => return Err(QueryError::Unknown(printable(other))),
            };
            if slot.is_some() {
                return Err(QueryError::Repeated(param.name));
            }
            *slot = Some(param.parse(&value)?);
        }
        // The ranges checked in `Param::parse` make these narrowings exact.
        let narrow = |n: u64| u8::try_from(n).unwrap_or(u8::MAX);
        Ok(JobsQuery {
            offset: offset.ok_or(QueryError::Missing(OFFSET.name))?,
            limit: limit.map(narrow).ok_or(QueryError::Missing(LIMIT.name))?,
            job_type: job_type.map(narrow),
            status: status.map(narrow),
        })
    }

    /// The canonical query string sent upstream: known parameters only, in
    /// the fixed order offset, limit, type, status, without leading zeros.
    pub fn canonical(&self) -> String {
        let mut out = format!("offset={}&limit={}", self.offset, self.limit);
        if let Some(t) = self.job_type {
            out.push_str(&format!("&type={t}"));
        }
        if let Some(s) = self.status {
            out.push_str(&format!("&status={s}"));
        }
        out
    }
}

impl fmt::Display for JobsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// A parameter name safe to echo: at most 64 characters, escaped.
fn printable(name: &str) -> String {
    let short: String = name.chars().take(64).collect();
    short.escape_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<JobsQuery, QueryError> {
        JobsQuery::parse(Some(raw))
    }

    #[test]
    fn minimal_query_parses_and_is_canonical() {
        let q = parse("limit=2&offset=0").unwrap();
        assert_eq!(q.canonical(), "offset=0&limit=2");
    }

    #[test]
    fn leading_zeros_are_dropped_in_canonical_form() {
        let q = parse("offset=000&limit=007&type=03&status=00").unwrap();
        assert_eq!(q.canonical(), "offset=0&limit=7&type=3&status=0");
    }

    #[test]
    fn all_parameters_in_fixed_order() {
        let q = parse("status=3&type=7&limit=100&offset=9223372036854775807").unwrap();
        assert_eq!(
            q.canonical(),
            "offset=9223372036854775807&limit=100&type=7&status=3"
        );
    }

    #[test]
    fn bad_values_name_their_parameter() {
        let cases = [
            ("offset=-1&limit=1", "offset"),
            ("offset=%2B5&limit=1", "offset"),
            ("offset=+5&limit=1", "offset"),
            ("offset=1e2&limit=1", "offset"),
            ("offset=0x10&limit=1", "offset"),
            ("offset=%205&limit=1", "offset"),
            ("offset=9223372036854775808&limit=1", "offset"),
            (
                "offset=99999999999999999999999999999999999&limit=1",
                "offset",
            ),
            ("offset=%D9%A3&limit=1", "offset"),
            ("offset=&limit=1", "offset"),
            ("offset&limit=1", "offset"),
            ("offset=0&limit=0", "limit"),
            ("offset=0&limit=101", "limit"),
            ("offset=0&limit=1.0", "limit"),
            ("offset=0&limit=1&type=0", "type"),
            ("offset=0&limit=1&type=8", "type"),
            ("offset=0&limit=1&status=4", "status"),
            ("offset=0&limit=1&status=-0", "status"),
        ];
        for (raw, name) in cases {
            let err = parse(raw).unwrap_err();
            assert_eq!(err.code(), "invalid_parameter", "{raw}");
            assert!(
                err.to_string().contains(&format!("`{name}`")),
                "{raw}: {err}"
            );
        }
    }

    #[test]
    fn missing_required_parameters_are_named() {
        assert_eq!(parse("limit=1"), Err(QueryError::Missing("offset")));
        assert_eq!(parse("offset=1"), Err(QueryError::Missing("limit")));
        assert_eq!(JobsQuery::parse(None), Err(QueryError::Missing("offset")));
    }

    #[test]
    fn repeated_and_unknown_parameters_are_rejected() {
        assert_eq!(
            parse("offset=0&limit=1&limit=2"),
            Err(QueryError::Repeated("limit"))
        );
        assert_eq!(
            parse("offset=0&limit=1&Limit=2"),
            Err(QueryError::Unknown("Limit".into()))
        );
        let long = format!("offset=0&limit=1&{}=1", "x".repeat(500));
        match parse(&long) {
            Err(QueryError::Unknown(name)) => assert_eq!(name.len(), 64),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn query() -> impl Strategy<Value = JobsQuery> {
        (
            0..=i64::MAX as u64,
            1..=100u8,
            proptest::option::of(1..=7u8),
            proptest::option::of(0..=3u8),
        )
            .prop_map(|(offset, limit, job_type, status)| JobsQuery {
                offset,
                limit,
                job_type,
                status,
            })
    }

    /// Whether the rejection's message names the parameter it is about: one
    /// of the schema's, or the unknown one as sent, escaped (no control
    /// characters reach the client).
    fn names_a_parameter(error: &QueryError) -> bool {
        let name: &str = match error {
            QueryError::Missing(name) | QueryError::Repeated(name) => name,
            QueryError::Invalid { name, .. } => name,
            QueryError::Unknown(name) => name,
        };
        error.to_string().contains(&format!("`{name}`")) && !name.chars().any(char::is_control)
    }

    proptest! {
        #[test]
        fn the_canonical_form_parses_back_to_the_same_query(query in query()) {
            let canonical = query.canonical();
            let parsed = JobsQuery::parse(Some(&canonical)).unwrap();
            prop_assert_eq!(&parsed, &query);
            prop_assert_eq!(parsed.canonical(), canonical);
        }

        #[test]
        fn any_order_and_leading_zeros_parse_to_the_same_canonical_form(
            query in query(),
            zeros in proptest::collection::vec(0..4usize, 4),
            order in Just(vec![0usize, 1, 2, 3]).prop_shuffle(),
        ) {
            let pairs = [
                ("offset", Some(query.offset)),
                ("limit", Some(u64::from(query.limit))),
                ("type", query.job_type.map(u64::from)),
                ("status", query.status.map(u64::from)),
            ];
            let raw: Vec<String> = order
                .iter()
                .filter_map(|&i| {
                    let (name, value) = pairs[i];
                    value.map(|v| format!("{name}={}{v}", "0".repeat(zeros[i])))
                })
                .collect();
            let raw = raw.join("&");
            let parsed = JobsQuery::parse(Some(&raw)).unwrap();
            prop_assert_eq!(parsed.canonical(), query.canonical());
        }

        #[test]
        fn any_query_string_is_accepted_canonically_or_refused_naming_a_parameter(
            raw in "(offset|limit|type|status|x|%[0-9A-F]{2}|[=&+0-9a-z%\\x00-\\x7f\u{80}-\u{10ffff}]){0,40}",
        ) {
            match JobsQuery::parse(Some(&raw)) {
                Ok(query) => {
                    let again = JobsQuery::parse(Some(&query.canonical())).unwrap();
                    prop_assert_eq!(again, query);
                }
                Err(error) => {
                    prop_assert!(names_a_parameter(&error), "{error} for {raw:?}");
                    prop_assert!(!error.code().is_empty());
                }
            }
        }
    }
}
