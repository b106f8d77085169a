//! `switchyard keys`: the store's key-encryption keys.

use std::io::Write;

use clap::{Args, Subcommand};
use switchyard_store::{SqlStore, SqlStoreOptions};

use super::{BoxError, StoreArgs};

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Re-wrap every session's data key under the first --kek-file (the new KEK), online
    /// and resumable, without re-encrypting any message. Give every KEK still in use after
    /// it. Nodes must already hold the new KEK first (README: "Rotating the KEK").
    RotateKek(RotateKekArgs),
}

#[derive(Args)]
pub(crate) struct RotateKekArgs {
    #[command(flatten)]
    store: StoreArgs,
}

pub(crate) async fn run_rotate_kek(args: RotateKekArgs) -> Result<(), BoxError> {
    let args = args.store;
    let keys = args.keks()?.ok_or(
        "give the new KEK with --kek-file NEW first, then every KEK still in use: --kek-file OLD",
    )?;
    let options = match args.store.as_deref() {
        Some("memory") => return Err("a memory store keeps nothing to rotate".into()),
        Some(url) => SqlStoreOptions::new(url),
        None => {
            let path = args.data_dir.join("switchyard.db");
            if !path.exists() {
                return Err(format!(
                    "no store at {} (give --store or --data-dir)",
                    path.display()
                )
                .into());
            }
            SqlStoreOptions::sqlite_file(&path)
        }
    };
    let active = keys.active_id().to_string();
    let store = SqlStore::open(options.with_keys(keys)).await?;
    let mut out = std::io::stdout();
    let rewrapped = store
        .rotate_kek(|done, of| {
            let _ = writeln!(out, "re-wrapped {done} of {of} data keys");
        })
        .await?;
    tracing::info!(
        target: "switchyard::audit",
        event = "kek rotated",
        caller = "switchyard keys rotate-kek",
        outcome = format!("{rewrapped} data keys re-wrapped under KEK {active}"),
        "audit"
    );
    let _ = writeln!(
        std::io::stdout(),
        "every data key is wrapped by KEK {active} ({rewrapped} re-wrapped now): the other KEKs can be retired from every node's --kek-file"
    );
    Ok(())
}
