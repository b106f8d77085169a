//! The coordinator's placement table as the store keeps it.

use serde_json::{Value, json};
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

impl StoredPlacement {
    pub(crate) fn to_json(&self) -> String {
        let owners: Vec<Value> = self
            .table
            .owner_indexes()
            .iter()
            .map(|owner| owner.map_or(Value::Null, Value::from))
            .collect();
        json!({
            "epoch": self.epoch.0,
            "workers": self.table.workers().iter().map(|worker| worker.as_str()).collect::<Vec<_>>(),
            "owners": owners,
            "members": self.table.members().iter().map(|worker| worker.as_str()).collect::<Vec<_>>(),
            "addresses": self.addresses.iter().map(|(worker, address)| json!([worker.as_str(), address])).collect::<Vec<_>>(),
            "draining": self.draining.iter().map(|worker| worker.as_str()).collect::<Vec<_>>(),
        })
        .to_string()
    }

    pub(crate) fn from_json(text: &str) -> Result<StoredPlacement> {
        let bad = |what: &str| StoreError::Corrupt(format!("stored placement: {what}"));
        let value: Value = serde_json::from_str(text).map_err(|error| bad(&error.to_string()))?;
        let epoch = Epoch(value["epoch"].as_u64().ok_or_else(|| bad("no epoch"))?);
        let ids = |field: &str| -> Result<Vec<WorkerId>> {
            value[field]
                .as_array()
                .ok_or_else(|| bad(&format!("no {field}")))?
                .iter()
                .map(|id| {
                    id.as_str()
                        .and_then(|id| WorkerId::parse(id).ok())
                        .ok_or_else(|| bad(&format!("invalid worker id in {field}")))
                })
                .collect()
        };
        let workers = ids("workers")?;
        let members = ids("members")?;
        let draining = if value.get("draining").is_some() {
            ids("draining")?
        } else {
            Vec::new()
        };
        let owners = value["owners"]
            .as_array()
            .ok_or_else(|| bad("no owners"))?
            .iter()
            .map(|owner| match owner {
                Value::Null => Ok(None),
                other => other
                    .as_u64()
                    .and_then(|index| u32::try_from(index).ok())
                    .map(Some)
                    .ok_or_else(|| bad("invalid owner index")),
            })
            .collect::<Result<Vec<_>>>()?;
        let addresses = value["addresses"]
            .as_array()
            .ok_or_else(|| bad("no addresses"))?
            .iter()
            .map(|pair| {
                let worker = pair[0].as_str().and_then(|id| WorkerId::parse(id).ok());
                let address = pair[1].as_str().map(str::to_string);
                worker
                    .zip(address)
                    .ok_or_else(|| bad("invalid address entry"))
            })
            .collect::<Result<Vec<_>>>()?;
        let table = PlacementTable::from_parts(epoch, workers, owners, members)
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
}
