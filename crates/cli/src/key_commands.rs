//! `switchyard keys`: the store's key-encryption keys; `switchyard api-key`: callers' keys.

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

#[derive(Subcommand)]
pub(crate) enum ApiKeyCommand {
    /// Make a new key: prints it once, with the entry to paste into the --api-keys file
    /// (which stores only its SHA-256).
    New(NewApiKeyArgs),
}

#[derive(Args)]
pub(crate) struct NewApiKeyArgs {
    /// A name for the key, shown in logs and errors (e.g. the calling service).
    #[arg(long)]
    name: String,
    /// What the key may call: sessions, admin-read or admin; repeat for several.
    #[arg(long = "scope", required = true)]
    scopes: Vec<String>,
    /// Let the key act only for user ids that start with this (a tenant), e.g. "acme:".
    #[arg(long)]
    user_prefix: Option<String>,
}

pub(crate) fn new_api_key(args: NewApiKeyArgs) -> Result<(), BoxError> {
    use switchyard_core::api_key::{API_KEY_PREFIX, hash_api_key, sha256_hex};
    use switchyard_core::{ApiKey, ApiKeys, Scope};

    let scopes = args
        .scopes
        .iter()
        .map(|scope| Scope::parse(scope))
        .collect::<Result<Vec<_>, _>>()?;
    let key = format!("{API_KEY_PREFIX}{}", switchyard_cli::keys::random_hex(32)?);
    let entry = ApiKey {
        name: args.name,
        hash: hash_api_key(&key),
        scopes,
        user_prefix: args.user_prefix,
    };
    // The same checks as the coordinator makes when it reads the file.
    ApiKeys::new(vec![entry.clone()])?;
    let scopes: Vec<String> = entry
        .scopes
        .iter()
        .map(|scope| format!("{:?}", scope.as_str()))
        .collect();
    let mut text = format!(
        "API key (shown only now; give it to the caller, who sends it as `authorization: Bearer <key>`):\n{key}\n\n\
         Entry for the --api-keys file:\n[[keys]]\nname = {:?}\nsha256 = \"{}\"\nscopes = [{}]\n",
        entry.name,
        sha256_hex(&entry.hash),
        scopes.join(", ")
    );
    if let Some(prefix) = &entry.user_prefix {
        text += &format!("user_prefix = {prefix:?}\n");
    }
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}
