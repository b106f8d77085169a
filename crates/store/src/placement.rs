//! The coordinator's placement table as the store keeps it.

use serde::{Deserialize, Serialize};
use switchyard_core::{Epoch, PlacementTable, WorkerId};

use crate::{Result, StoreError};

/// A placement table with the address of each worker in it, so a restarted coordinator can
/// route to the workers before they register again.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlacement {
    pub epoch: Epoch,
    pub table: PlacementTable,
    /// `(worker, address)` for every member of the table.
    pub addresses: Vec<(WorkerId, String)>,
    /// Members being drained.
    pub draining: Vec<WorkerId>,
}

/// The JSON the store keeps (the same shape since the table was first stored).
#[derive(Serialize, Deserialize)]
struct PlacementRecord {
    epoch: u64,
    workers: Vec<String>,
    /// `owners[slot]` indexes `workers`; `null` for a slot with no live owner.
    owners: Vec<Option<u32>>,
    members: Vec<String>,
    /// `[worker, address]` pairs.
    addresses: Vec<(String, String)>,
    #[serde(default)]
    draining: Vec<String>,
}

impl StoredPlacement {
    pub(crate) fn to_json(&self) -> String {
        let names = |workers: &[WorkerId]| -> Vec<String> {
            workers.iter().map(ToString::to_string).collect()
        };
        let record = PlacementRecord {
            epoch: self.epoch.0,
            workers: names(self.table.workers()),
            owners: self.table.owner_indexes().to_vec(),
            members: names(self.table.members()),
            addresses: self
                .addresses
                .iter()
                .map(|(worker, address)| (worker.to_string(), address.clone()))
                .collect(),
            draining: names(&self.draining),
        };
        // A struct of strings and numbers always serializes.
        serde_json::to_string(&record).unwrap_or_default()
    }

    pub(crate) fn from_json(text: &str) -> Result<StoredPlacement> {
        let bad = |what: &str| StoreError::Corrupt(format!("stored placement: {what}"));
        let record: PlacementRecord =
            serde_json::from_str(text).map_err(|error| bad(&error.to_string()))?;
        let ids = |field: &str, names: Vec<String>| -> Result<Vec<WorkerId>> {
            names
                .into_iter()
                .map(|name| {
                    WorkerId::parse(name).map_err(|_| bad(&format!("invalid worker id in {field}")))
                })
                .collect()
        };
        let epoch = Epoch(record.epoch);
        let workers = ids("workers", record.workers)?;
        let members = ids("members", record.members)?;
        let draining = ids("draining", record.draining)?;
        let addresses = record
            .addresses
            .into_iter()
            .map(|(worker, address)| {
                WorkerId::parse(worker)
                    .map(|worker| (worker, address))
                    .map_err(|_| bad("invalid address entry"))
            })
            .collect::<Result<Vec<_>>>()?;
        let table = PlacementTable::from_parts(epoch, workers, record.owners, members)
            .map_err(|error| bad(&error.to_string()))?;
        Ok(StoredPlacement {
            epoch,
            table,
            addresses,
            draining,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let workers: Vec<WorkerId> = ["a", "b"]
            .iter()
            .map(|id| WorkerId::parse(*id).unwrap())
            .collect();
        let table = PlacementTable::empty(16)
            .rebalanced(&workers)
            .unwrap()
            .with_epoch(Epoch(7));
        let stored = StoredPlacement {
            epoch: Epoch(7),
            table,
            addresses: vec![
                (workers[0].clone(), "10.0.0.1:7000".into()),
                (workers[1].clone(), "10.0.0.2:7000".into()),
            ],
            draining: vec![workers[1].clone()],
        };
        assert_eq!(
            StoredPlacement::from_json(&stored.to_json()).unwrap(),
            stored
        );
        assert!(StoredPlacement::from_json("{\"epoch\": 1}").is_err());
    }

    #[test]
    fn tables_kept_by_earlier_versions_still_load() {
        // As written before the record was a serde struct, without `draining`.
        let kept = r#"{"epoch":3,"workers":["a","b"],"owners":[0,1,null,0],"members":["a","b"],"addresses":[["a","h:1"],["b","h:2"]]}"#;
        let stored = StoredPlacement::from_json(kept).unwrap();
        assert_eq!(stored.epoch, Epoch(3));
        assert_eq!(stored.table.slot_count(), 4);
        assert_eq!(stored.table.owner(2), None);
        assert!(stored.draining.is_empty());
        assert!(
            StoredPlacement::from_json(&kept.replace("\"a\",\"h:1\"", "\"a b\",\"h:1\"")).is_err()
        );
    }
}
