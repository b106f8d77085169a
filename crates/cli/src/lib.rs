//! What the `switchyard` binary runs, as a library so tests start the same thing.

pub mod admin;
pub mod agents;
pub mod bench;
pub mod ctl;
pub mod dev;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod store;
pub mod tls;

pub use dev::{DevCluster, DevClusterConfig};
