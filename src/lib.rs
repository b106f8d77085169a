//! Switchyard's wire API (`switchyard.v1`) and its Rust client SDK.
//!
//! A calling service needs a few lines:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = switchyard::SwitchyardClient::connect("http://127.0.0.1:50051").await?;
//! let created = client.create_session("alice", [("plan", "pro")]).await?;
//! let session_id = created.session.expect("a created session").session_id;
//! let reply = client.send_message_collect(&session_id, "echo", "hello").await?;
//! println!("{}", reply.text);
//! # Ok(())
//! # }
//! ```
//!
//! The client keeps the token of every session it created and attaches it to each call
//! about that session as the `x-session-token` metadata.

pub mod auth;
pub mod client;
pub mod codec;
pub mod conversions;
#[cfg(test)]
mod fuzz;
pub mod metadata;
pub mod retry;
pub mod status;
pub mod tls;

/// The generated messages, clients and servers of `switchyard.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("switchyard.v1");
}

/// The echo service `switchyard bench` measures its baseline with.
pub mod bench_pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("switchyard.bench.v1");
}

/// The encoded file descriptor set of every `switchyard.v1` proto file and its imports,
/// served by server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchyard_descriptor");

pub use client::{ClientError, SwitchyardClient, TurnReply};
pub use status::status_from;
