//! Cluster tests: a coordinator and workers in process on 127.0.0.1:0, driven through the
//! public client exactly as a calling service would.

#![allow(clippy::unwrap_used)]

mod sandbox;

mod errors;
mod failover;
mod health;
mod hostile;
mod isolation;
mod lifecycle;
mod placement;
mod quotas;
mod reflection;
mod retries;
mod tokens;
mod turns;
