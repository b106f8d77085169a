//! Conversions between wire messages and domain types. A malformed field becomes an
//! `InvalidArgument` error that names it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_core::alerts::{Alert, AlertFilter, Severity};
use switchyard_core::{
    ContextMessage, Epoch, Error, Message, PlacementTable, Role, Session, UserId, WorkerId,
};

use crate::pb;

/// Marks a slot with no owner in [`pb::PlacementTable::slot_owners`].
pub const NO_OWNER: u32 = u32::MAX;

pub fn timestamp_from(time: SystemTime) -> prost_types::Timestamp {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

pub fn system_time_from(timestamp: &prost_types::Timestamp) -> SystemTime {
    let seconds = u64::try_from(timestamp.seconds).unwrap_or_default();
    let nanos = u32::try_from(timestamp.nanos).unwrap_or_default();
    UNIX_EPOCH + Duration::new(seconds, nanos.min(999_999_999))
}

pub fn duration_to_wire(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A wire duration; `None` when it is negative or malformed.
pub fn duration_from_wire(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)?;
    Some(Duration::new(seconds, nanos))
}

/// The wire form of a session hosted by `worker_id`.
pub fn session_to_wire(session: &Session, worker_id: &WorkerId) -> pb::Session {
    pb::Session {
        session_id: session.id.to_string(),
        user_id: session.user_id.to_string(),
        worker_id: worker_id.to_string(),
        created_at: Some(timestamp_from(session.created_at)),
        last_activity_at: Some(timestamp_from(session.last_activity_at)),
        metadata: session
            .metadata
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        message_count: session.message_count,
        slot: session.slot,
        double_text: session.double_text.as_str().to_string(),
    }
}

pub fn metadata_from_wire(
    metadata: std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    metadata.into_iter().collect()
}

/// Messages of a request; `field` is the name of the repeated field they came in.
pub fn messages_from_wire(messages: Vec<pb::Message>, field: &str) -> Result<Vec<Message>, Error> {
    messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            let role = Role::parse(&message.role, format!("{field}[{index}].role"))?;
            Ok(Message {
                role,
                content: message.content,
                name: message.name,
            })
        })
        .collect()
}

pub fn context_message_to_wire(message: ContextMessage) -> pb::ContextMessage {
    pb::ContextMessage {
        seq: message.seq,
        role: message.role.as_str().to_string(),
        content: message.content,
        name: message.name,
        created_at: Some(timestamp_from(message.created_at)),
    }
}

pub fn placement_to_wire(
    table: &PlacementTable,
    address_of: impl Fn(&WorkerId) -> String,
) -> pb::PlacementTable {
    pb::PlacementTable {
        epoch: table.epoch().0,
        slot_count: table.slot_count(),
        workers: table
            .workers()
            .iter()
            .map(|worker| pb::WorkerEndpoint {
                worker_id: worker.to_string(),
                address: address_of(worker),
            })
            .collect(),
        slot_owners: table
            .owner_indexes()
            .iter()
            .map(|owner| owner.unwrap_or(NO_OWNER))
            .collect(),
        members: table.members().iter().map(ToString::to_string).collect(),
    }
}

pub fn placement_from_wire(table: pb::PlacementTable) -> Result<PlacementTable, Error> {
    if table.slot_owners.len() != table.slot_count as usize {
        return Err(Error::invalid(
            "placement.slot_owners",
            format!(
                "holds {} owners for {} slots",
                table.slot_owners.len(),
                table.slot_count
            ),
        ));
    }
    let workers = table
        .workers
        .into_iter()
        .map(|worker| WorkerId::parse(worker.worker_id))
        .collect::<Result<Vec<_>, _>>()?;
    let owners = table
        .slot_owners
        .into_iter()
        .map(|owner| (owner != NO_OWNER).then_some(owner))
        .collect();
    let members = table
        .members
        .into_iter()
        .map(WorkerId::parse)
        .collect::<Result<Vec<_>, _>>()?;
    PlacementTable::from_parts(Epoch(table.epoch), workers, owners, members)
}

/// The filter of a ListAlerts; a bad field is INVALID_ARGUMENT naming it.
pub fn alert_filter(request: &pb::ListAlertsRequest) -> Result<AlertFilter, Error> {
    let severity = match request.severity.as_str() {
        "" => None,
        text => Some(Severity::parse(text).ok_or_else(|| {
            Error::invalid(
                "severity",
                format!("{text:?} is not a severity: warning or critical"),
            )
        })?),
    };
    let user_id = match request.user_id.as_str() {
        "" => None,
        text => Some(UserId::parse(text)?.to_string()),
    };
    let since = match &request.since {
        Some(since) if since.seconds < 0 || !(0..1_000_000_000).contains(&since.nanos) => {
            return Err(Error::invalid(
                "since",
                "must be a time after 1970 with nanos in 0..1e9",
            ));
        }
        Some(since) => Some(system_time_from(since)),
        None => None,
    };
    Ok(AlertFilter {
        since,
        severity,
        user_id,
    })
}

pub fn alert_to_wire(alert: &Alert, node: &str) -> pb::Alert {
    let latest = &alert.latest;
    pb::Alert {
        kind: latest.kind.to_string(),
        severity: latest.severity.as_str().to_string(),
        message: latest.message.clone(),
        subject: latest.subject.clone(),
        user_id: latest.user_id.clone().unwrap_or_default(),
        session_id: latest.session_id.clone().unwrap_or_default(),
        node: node.to_string(),
        first_seen: Some(timestamp_from(alert.first_seen)),
        last_seen: Some(timestamp_from(alert.last_seen)),
        count: alert.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_round_trips() {
        let workers: Vec<WorkerId> = ["a", "b"]
            .iter()
            .map(|id| WorkerId::parse(*id).unwrap())
            .collect();
        let table = PlacementTable::empty(16).rebalanced(&workers).unwrap();
        let wire = placement_to_wire(&table, |worker| format!("{worker}:1"));
        assert_eq!(
            wire.workers[0].address,
            format!("{}:1", wire.workers[0].worker_id)
        );
        assert_eq!(placement_from_wire(wire).unwrap(), table);
    }

    #[test]
    fn bad_roles_name_their_index() {
        let messages = vec![
            pb::Message {
                role: "user".into(),
                content: "hi".into(),
                name: String::new(),
            },
            pb::Message {
                role: "root".into(),
                content: "x".into(),
                name: String::new(),
            },
        ];
        let error = messages_from_wire(messages, "messages").unwrap_err();
        assert!(
            error.to_string().starts_with("messages[1].role: "),
            "{error}"
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let now = SystemTime::now();
        assert_eq!(system_time_from(&timestamp_from(now)), now);
    }
}
