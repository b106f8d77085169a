//! Process-level tests: the real `switchyard` binary as separate processes, driven over
//! gRPC and with signals, as an operator would run it.

#![allow(clippy::unwrap_used)]

mod agents;
mod audit;
mod bench;
mod cluster;
mod ctl;
mod deploy_files;
mod durability;
mod exactly_once;
mod harness;
mod metrics;
mod multihost;
mod otlp;
mod placement;
mod pressure;
mod quotas;
mod readiness;
mod readme;
mod sealing;
mod security;
mod tls;
mod token_rotation;
mod traces;
mod turn_crash;
