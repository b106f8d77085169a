//! Limits and rate limits as flags and the admin API give them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use switchyard_core::quota::Resource;
use switchyard_store::StoredLimit;

/// The longest window a limit may have.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// `limit` of a resource per sliding `window` (zero for the resources that are a level).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub limit: f64,
    pub window: Duration,
}

impl Limit {
    /// Checks a limit of `resource`; the error names what is wrong, for `field`.
    pub fn validate(resource: Resource, limit: f64, window: Duration) -> Result<Limit, String> {
        if !limit.is_finite() || limit < 0.0 {
            return Err(format!("limit: must be a number, 0 or more (got {limit})"));
        }
        if resource.is_windowed() {
            if window.is_zero() {
                return Err(format!(
                    "window: {resource} is counted per window, which must be longer than 0"
                ));
            }
            if window > MAX_WINDOW {
                return Err("window: must be at most 30 days".to_string());
            }
            Ok(Limit { limit, window })
        } else {
            // A level has no window: whatever was given is dropped.
            Ok(Limit {
                limit,
                window: Duration::ZERO,
            })
        }
    }

    pub fn to_stored(self, resource: Resource) -> StoredLimit {
        StoredLimit {
            resource: resource.name().to_string(),
            limit: self.limit,
            window_us: self.window.as_micros() as u64,
        }
    }

    pub fn from_stored(stored: &StoredLimit) -> Option<(Resource, Limit)> {
        let resource = Resource::parse(&stored.resource)?;
        let limit = Limit::validate(
            resource,
            stored.limit,
            Duration::from_micros(stored.window_us),
        )
        .ok()?;
        Some((resource, limit))
    }
}

/// Parses a `--quota` flag: `RESOURCE=LIMIT/WINDOW` (`tokens=100000/1h`), or
/// `RESOURCE=LIMIT` for a level (`sessions=5`, `storage_bytes=10000000`).
pub fn parse_quota(text: &str) -> Result<(Resource, Limit), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| {
        format!("{text:?}: expected RESOURCE=LIMIT/WINDOW, e.g. tokens=100000/1h")
    })?;
    let resource = Resource::parse(name.trim()).ok_or_else(|| {
        format!(
            "{name:?} is not a resource; the resources are {}",
            Resource::ALL.map(Resource::name).join(", ")
        )
    })?;
    let (limit, window) = match value.split_once('/') {
        Some((limit, window)) => (limit, Some(window)),
        None => (value, None),
    };
    let limit: f64 = limit
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {limit:?} is not a number"))?;
    let window = match window {
        Some(window) => parse_period(window.trim()).ok_or_else(|| {
            format!("{text:?}: {window:?} is not a duration such as 1s, 1m, 1h, 30days")
        })?,
        None if resource.is_windowed() => {
            return Err(format!(
                "{text:?}: {resource} is counted per window: give one, e.g. {resource}={limit}/1h"
            ));
        }
        None => Duration::ZERO,
    };
    let limit =
        Limit::validate(resource, limit, window).map_err(|error| format!("{text:?}: {error}"))?;
    Ok((resource, limit))
}

/// `s`, `m`, `h`, `d` alone mean one of them; otherwise a humantime duration.
fn parse_period(text: &str) -> Option<Duration> {
    match text {
        "s" | "sec" | "second" => Some(Duration::from_secs(1)),
        "m" | "min" | "minute" => Some(Duration::from_secs(60)),
        "h" | "hour" => Some(Duration::from_secs(3600)),
        "d" | "day" => Some(Duration::from_secs(86_400)),
        _ => humantime::parse_duration(text).ok(),
    }
}

/// At most `count` calls per `period`, with bursts of up to `burst` (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// Parses `COUNT/PERIOD` (`20/s`, `600/1m`); the burst is the count unless given.
    pub fn parse(text: &str, burst: Option<u32>) -> Result<RateLimit, String> {
        let (count, period) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected COUNT/PERIOD, e.g. 20/s"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| format!("{text:?}: {count:?} is not a whole number above 0"))?;
        let period = parse_period(period.trim())
            .filter(|period| !period.is_zero())
            .ok_or_else(|| format!("{text:?}: {period:?} is not a duration such as s, 1m"))?;
        let burst = burst.unwrap_or(count);
        if burst == 0 {
            return Err("a burst must be at least 1".to_string());
        }
        Ok(RateLimit {
            count,
            period,
            burst,
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} (burst {})",
            self.count,
            humantime::format_duration(self.period),
            self.burst
        )
    }
}

/// A worker's quota defaults and rate limits. The default is no limit at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaConfig {
    /// Every user's limits unless overridden.
    pub defaults: BTreeMap<Resource, Limit>,
    pub user_rate: Option<RateLimit>,
    pub session_rate: Option<RateLimit>,
    /// How often usage that came without an append is saved (`None`: every
    /// [`super::FLUSH_INTERVAL`]).
    pub save_interval: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_flags_parse_and_bad_ones_name_the_problem() {
        assert_eq!(
            parse_quota("tokens=100000/1h").unwrap(),
            (
                Resource::Tokens,
                Limit {
                    limit: 100_000.0,
                    window: Duration::from_secs(3600)
                }
            )
        );
        assert_eq!(
            parse_quota("api_calls=20/s").unwrap().1.window,
            Duration::from_secs(1)
        );
        assert_eq!(
            parse_quota("cost_usd=2.5/30days").unwrap().1,
            Limit {
                limit: 2.5,
                window: Duration::from_secs(30 * 86_400)
            }
        );
        assert_eq!(
            parse_quota("sessions=5").unwrap(),
            (
                Resource::Sessions,
                Limit {
                    limit: 5.0,
                    window: Duration::ZERO
                }
            )
        );
        for (bad, says) in [
            ("tokens", "expected RESOURCE=LIMIT/WINDOW"),
            ("bananas=1/1h", "not a resource"),
            ("tokens=lots/1h", "not a number"),
            ("tokens=-1/1h", "0 or more"),
            ("tokens=10", "counted per window"),
            ("tokens=10/0s", "longer than 0"),
            ("tokens=10/31days", "at most 30 days"),
            ("tokens=10/fortnight", "not a duration"),
        ] {
            let error = parse_quota(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn rates_parse_with_their_burst() {
        assert_eq!(
            RateLimit::parse("20/s", Some(40)).unwrap(),
            RateLimit {
                count: 20,
                period: Duration::from_secs(1),
                burst: 40
            }
        );
        assert_eq!(RateLimit::parse("600/1m", None).unwrap().burst, 600);
        assert!(RateLimit::parse("0/s", None).is_err());
        assert!(RateLimit::parse("5", None).is_err());
        assert!(RateLimit::parse("5/s", Some(0)).is_err());
    }
}
