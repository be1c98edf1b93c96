//! Durations written the way Kubernetes users write them (Go's `time.Duration` syntax: `30s`, `1m30s`).

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The grammar the API server enforces: one or more `<number><unit>` terms, no sign.
const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A non-negative duration in Go syntax, kept as the user wrote it so that it round-trips unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration: write a positive number with a unit, such as 30s, 1m or 1h30m")]
pub struct DurationError {
    text: String,
}

impl GoDuration {
    pub fn as_duration(&self) -> Duration {
        self.value
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<Duration> for GoDuration {
    fn from(value: Duration) -> Self {
        let text = if value.subsec_nanos() == 0 {
            format!("{}s", value.as_secs())
        } else {
            format!("{}ms", value.as_millis())
        };
        Self { text, value }
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || DurationError { text: text.to_owned() };
        if text.is_empty() {
            return Err(err());
        }
        let mut total = 0f64;
        let mut rest = text;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
            let (number, tail) = rest.split_at(number_len);
            if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
                return Err(err());
            }
            let number: f64 = number.parse().map_err(|_| err())?;
            let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let nanos_per_unit = match unit {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(err()),
            };
            total += number * nanos_per_unit;
            rest = tail;
        }
        if !total.is_finite() || total > u64::MAX as f64 {
            return Err(err());
        }
        Ok(Self { text: text.to_owned(), value: Duration::from_nanos(total as u64) })
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": format!("self.matches('{}')", PATTERN.replace('\\', "\\\\")),
                "message": "must be a positive duration with a unit, such as 500ms, 30s, 1m or 1h30m",
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        let cases = [
            ("30s", Duration::from_secs(30)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5h", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            let parsed: GoDuration = text.parse().expect(text);
            assert_eq!(parsed.as_duration(), expected, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn refuses_what_the_api_server_refuses() {
        for text in ["", "-1s", "30", "s", "1x", "1.s", ".5s", "1m-1s", "+5s", " 5s"] {
            assert!(text.parse::<GoDuration>().is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn from_duration_round_trips() {
        for d in [Duration::from_secs(30), Duration::from_millis(1500)] {
            let text = GoDuration::from(d).to_string();
            assert_eq!(text.parse::<GoDuration>().map(|g| g.as_duration()), Ok(d));
        }
    }
}
