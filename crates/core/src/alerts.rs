//! Alerts a node raises about what it serves: kept in a bounded log keyed by what they are
//! about, each with when it was first and last seen and how often.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// What an alert is about: one kind, about one subject (a session, a user's resource, an
/// agent type, a worker). A second raise of the same key updates the first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AlertKey {
    pub kind: &'static str,
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The latest raise: its kind and subject are the alert's, its severity and words the
    /// newest.
    pub latest: Raise,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub count: u64,
}

/// One raise of an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Raise {
    pub kind: &'static str,
    pub subject: String,
    pub severity: Severity,
    pub message: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
}

/// At most `capacity` alerts; a new one past it pushes out the one seen longest ago.
pub struct AlertLog {
    capacity: usize,
    alerts: Mutex<HashMap<AlertKey, Alert>>,
}

/// What a listing keeps.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// Only alerts seen at or after this.
    pub since: Option<SystemTime>,
    /// Only alerts at least this bad.
    pub severity: Option<Severity>,
    pub user_id: Option<String>,
}

impl AlertFilter {
    pub fn keeps(&self, alert: &Alert) -> bool {
        self.since.is_none_or(|since| alert.last_seen >= since)
            && self
                .severity
                .is_none_or(|least| alert.latest.severity >= least)
            && self
                .user_id
                .as_ref()
                .is_none_or(|user| alert.latest.user_id.as_ref() == Some(user))
    }
}

impl AlertLog {
    pub fn new(capacity: usize) -> Self {
        AlertLog {
            capacity: capacity.max(1),
            alerts: Mutex::new(HashMap::new()),
        }
    }

    fn alerts(&self) -> std::sync::MutexGuard<'_, HashMap<AlertKey, Alert>> {
        self.alerts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a raise at `now`; returns whether it is new (not an update of one kept).
    pub fn raise(&self, raise: Raise, now: SystemTime) -> bool {
        let key = AlertKey {
            kind: raise.kind,
            subject: raise.subject.clone(),
        };
        let mut alerts = self.alerts();
        if let Some(alert) = alerts.get_mut(&key) {
            alert.latest = raise;
            alert.last_seen = now;
            alert.count += 1;
            return false;
        }
        if alerts.len() >= self.capacity
            && let Some(oldest) = alerts
                .iter()
                .min_by_key(|(_, alert)| alert.last_seen)
                .map(|(key, _)| key.clone())
        {
            alerts.remove(&oldest);
        }
        alerts.insert(
            key,
            Alert {
                latest: raise,
                first_seen: now,
                last_seen: now,
                count: 1,
            },
        );
        true
    }

    /// The alerts the filter keeps, newest first.
    pub fn list(&self, filter: &AlertFilter) -> Vec<Alert> {
        let mut listed: Vec<Alert> = self
            .alerts()
            .values()
            .filter(|alert| filter.keeps(alert))
            .cloned()
            .collect();
        listed.sort_by_key(|alert| std::cmp::Reverse(alert.last_seen));
        listed
    }

    pub fn len(&self) -> usize {
        self.alerts().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn raise(kind: &'static str, subject: &str, severity: Severity, user: &str) -> Raise {
        Raise {
            kind,
            subject: subject.to_string(),
            severity,
            message: format!("{kind} about {subject}"),
            user_id: Some(user.to_string()),
            session_id: None,
        }
    }

    #[test]
    fn a_raise_again_updates_and_the_log_stays_bounded() {
        let log = AlertLog::new(3);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert!(log.raise(raise("error_rate", "s1", Severity::Critical, "ada"), at(0)));
        assert!(!log.raise(raise("error_rate", "s1", Severity::Warning, "ada"), at(5)));
        let listed = log.list(&AlertFilter::default());
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].count, listed[0].first_seen, listed[0].last_seen),
            (2, at(0), at(5))
        );
        assert_eq!(listed[0].latest.severity, Severity::Warning);

        assert!(log.raise(
            raise("quota", "ada:tokens", Severity::Warning, "ada"),
            at(6)
        ));
        assert!(log.raise(raise("slow_turns", "s2", Severity::Warning, "bob"), at(7)));
        // A fourth key pushes out the one seen longest ago (s1, at 5 s).
        assert!(log.raise(
            raise("quota", "bob:tokens", Severity::Critical, "bob"),
            at(8)
        ));
        assert_eq!(log.len(), 3);
        let kinds: Vec<_> = log
            .list(&AlertFilter::default())
            .into_iter()
            .map(|alert| alert.latest.subject)
            .collect();
        assert_eq!(kinds, ["bob:tokens", "s2", "ada:tokens"]);

        let filter = |since, severity, user: Option<&str>| AlertFilter {
            since,
            severity,
            user_id: user.map(str::to_string),
        };
        assert_eq!(log.list(&filter(Some(at(7)), None, None)).len(), 2);
        assert_eq!(
            log.list(&filter(None, Some(Severity::Critical), None))[0]
                .latest
                .subject,
            "bob:tokens"
        );
        assert_eq!(log.list(&filter(None, None, Some("ada"))).len(), 1);
        assert_eq!(log.list(&filter(None, None, Some("carol"))).len(), 0);
    }
}
