//! Loading agent types from `--agents FILE` (TOML; see `switchyard_agents::config`).

use std::path::Path;

use switchyard_agents::AgentCatalog;
use switchyard_agents::config::AgentsConfig;

/// The catalog of the file, or only the built-in `echo` agent without one.
pub fn load(path: Option<&Path>) -> Result<AgentCatalog, String> {
    let Some(path) = path else {
        return Ok(AgentCatalog::with_builtin());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the agents file {}: {error}", path.display()))?;
    let config: AgentsConfig = toml::from_str(&text)
        .map_err(|error| format!("agents file {}: {error}", path.display()))?;
    config
        .catalog()
        .map_err(|error| format!("agents file {}: {error}", path.display()))
}
