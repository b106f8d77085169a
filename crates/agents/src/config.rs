//! Agent types as configuration: name, role, goal, instructions, backend, model options and
//! pool sizes. The `switchyard` binary reads them from a TOML file (`--agents FILE`):
//!
//! ```toml
//! [agents.echo]
//! backend = "echo"
//!
//! [agents.helper]
//! role = "support agent"
//! goal = "answer billing questions"
//! instructions = "Be brief."
//! backend = "process"        # echo | openai | process
//! process = { program = "python3", args = ["examples/agents/echo_agent.py"] }
//! pool = { min = 1, max = 8, idle_timeout = "5m", acquire_timeout = "10s" }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::{AgentCatalog, EchoConfig, OpenAiConfig, PoolConfig, ProcessConfig};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    #[serde(default)]
    pub agents: BTreeMap<String, AgentTypeConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Echo,
    Openai,
    Process,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTypeConfig {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub goal: String,
    #[serde(default)]
    pub instructions: String,
    pub backend: Backend,
    #[serde(default)]
    pub echo: EchoSettings,
    pub process: Option<ProcessSettings>,
    pub openai: Option<OpenAiSettings>,
    #[serde(default)]
    pub pool: PoolSettings,
    /// How long one turn may run before its instance is stopped (default 5m).
    #[serde(default = "default_turn_timeout", deserialize_with = "duration")]
    pub turn_timeout: Duration,
    /// How much of the context a turn sends: `{ messages = 200, bytes = 1048576, tokens = … }`.
    #[serde(default)]
    pub context: ContextSettings,
    /// Reply tokens a turn reserves of the user's `tokens` quota before it runs (default:
    /// `openai.max_tokens`, else 1024); the real usage settles it after.
    pub max_reply_tokens: Option<u64>,
    /// US dollars per 1 000 tokens, for the `cost_usd` quota: `{ prompt_per_1k = 0.5,
    /// completion_per_1k = 1.5 }` (default: free).
    #[serde(default)]
    pub price: PriceSettings,
    /// Turn p95 above which a session is slow: its health drops and an alert is raised
    /// (default 30s).
    #[serde(default = "default_slow_turn", deserialize_with = "duration")]
    pub slow_turn: Duration,
}

fn default_slow_turn() -> Duration {
    crate::pool::DEFAULT_SLOW_TURN
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSettings {
    #[serde(default)]
    pub prompt_per_1k: f64,
    #[serde(default)]
    pub completion_per_1k: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextSettings {
    #[serde(default = "default_window_messages")]
    pub messages: usize,
    #[serde(default = "default_window_bytes")]
    pub bytes: usize,
    /// Estimated at four bytes a token.
    pub tokens: Option<u64>,
}

impl Default for ContextSettings {
    fn default() -> Self {
        ContextSettings {
            messages: default_window_messages(),
            bytes: default_window_bytes(),
            tokens: None,
        }
    }
}

fn default_window_messages() -> usize {
    switchyard_core::ContextWindow::default().max_messages
}

fn default_window_bytes() -> usize {
    switchyard_core::ContextWindow::default().max_bytes
}

fn default_turn_timeout() -> Duration {
    PoolConfig::default().turn_timeout
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSettings {
    /// e.g. https://api.openai.com/v1, or any OpenAI-compatible server.
    pub base_url: String,
    pub model: String,
    /// The environment variable that holds the API key.
    pub api_key_env: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    #[serde(default = "default_openai_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_openai_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_max_retries() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoSettings {
    #[serde(default = "default_chunk_chars")]
    pub chunk_chars: usize,
    #[serde(default, deserialize_with = "duration")]
    pub delay: Duration,
}

impl Default for EchoSettings {
    fn default() -> Self {
        EchoSettings {
            chunk_chars: default_chunk_chars(),
            delay: Duration::ZERO,
        }
    }
}

fn default_chunk_chars() -> usize {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSettings {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_ready_timeout", deserialize_with = "duration")]
    pub ready_timeout: Duration,
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    #[serde(default)]
    pub min: usize,
    #[serde(default = "default_max")]
    pub max: usize,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_acquire_timeout", deserialize_with = "duration")]
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        let defaults = PoolConfig::default();
        PoolSettings {
            min: defaults.min,
            max: defaults.max,
            idle_timeout: defaults.idle_timeout,
            acquire_timeout: defaults.acquire_timeout,
        }
    }
}

fn default_max() -> usize {
    PoolConfig::default().max
}

fn default_idle_timeout() -> Duration {
    PoolConfig::default().idle_timeout
}

fn default_acquire_timeout() -> Duration {
    PoolConfig::default().acquire_timeout
}

/// Durations as people write them: "500ms", "10s", "5m".
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|error| serde::de::Error::custom(format!("{text:?} is not a duration: {error}")))
}

impl AgentsConfig {
    /// The catalog these agent types make, after checking them. The built-in `echo` type
    /// is there unless the file defines its own.
    pub fn catalog(&self) -> Result<AgentCatalog, String> {
        let mut catalog = AgentCatalog::with_builtin();
        for (name, agent) in &self.agents {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(format!(
                    "agent type {name:?}: a name is 1 to 64 ASCII letters, digits, '-', '_' or '.'"
                ));
            }
            let pool = PoolConfig {
                min: agent.pool.min,
                max: agent.pool.max,
                idle_timeout: agent.pool.idle_timeout,
                acquire_timeout: agent.pool.acquire_timeout,
                turn_timeout: agent.turn_timeout,
                context_window: switchyard_core::ContextWindow {
                    max_messages: agent.context.messages,
                    max_bytes: agent.context.bytes,
                    max_tokens: agent.context.tokens,
                },
                max_reply_tokens: agent
                    .max_reply_tokens
                    .or_else(|| {
                        agent
                            .openai
                            .as_ref()
                            .and_then(|openai| openai.max_tokens.map(u64::from))
                    })
                    .unwrap_or(crate::pool::DEFAULT_MAX_REPLY_TOKENS),
                price: crate::pool::TokenPrice {
                    prompt_per_1k: agent.price.prompt_per_1k,
                    completion_per_1k: agent.price.completion_per_1k,
                },
                slow_turn: agent.slow_turn,
            };
            pool.validate(name)?;
            match agent.backend {
                Backend::Echo => {
                    if agent.process.is_some() {
                        return Err(format!(
                            "agent type {name}: `process` settings need backend = \"process\""
                        ));
                    }
                    let echo = EchoConfig {
                        chunk_chars: agent.echo.chunk_chars.max(1),
                        delay: agent.echo.delay,
                    };
                    catalog.register(name.clone(), Arc::new(echo), pool);
                }
                Backend::Openai => {
                    let Some(openai) = &agent.openai else {
                        return Err(format!(
                            "agent type {name}: backend = \"openai\" needs openai = {{ base_url = \"…\", model = \"…\" }}"
                        ));
                    };
                    let config = OpenAiConfig {
                        agent_type: name.clone(),
                        base_url: openai.base_url.clone(),
                        model: openai.model.clone(),
                        api_key_env: openai.api_key_env.clone(),
                        temperature: openai.temperature,
                        max_tokens: openai.max_tokens,
                        system_prompt: OpenAiConfig::system_prompt(
                            &agent.role,
                            &agent.goal,
                            &agent.instructions,
                        ),
                        timeout: openai.timeout,
                        max_retries: openai.max_retries,
                        backoff: Duration::from_millis(250),
                    };
                    catalog.register(name.clone(), Arc::new(config), pool);
                }
                Backend::Process => {
                    let Some(process) = &agent.process else {
                        return Err(format!(
                            "agent type {name}: backend = \"process\" needs process = {{ program = \"…\" }}"
                        ));
                    };
                    let config = ProcessConfig {
                        agent_type: name.clone(),
                        program: process.program.clone(),
                        args: process.args.clone(),
                        env: process
                            .env
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        ready_timeout: process.ready_timeout,
                    };
                    catalog.register(name.clone(), Arc::new(config), pool);
                }
            }
        }
        Ok(catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentCatalog, String> {
        let config: AgentsConfig = toml::from_str(text).map_err(|error| error.to_string())?;
        config.catalog()
    }

    #[test]
    fn a_full_file_makes_its_pools() {
        let catalog = parse(
            r#"
            [agents.helper]
            role = "support agent"
            backend = "process"
            process = { program = "python3", args = ["agent.py"], ready_timeout = "3s" }
            pool = { min = 1, max = 4, idle_timeout = "90s", acquire_timeout = "250ms" }

            [agents.slow]
            backend = "echo"
            echo = { chunk_chars = 2, delay = "10ms" }

            [agents.assistant]
            role = "a support agent"
            backend = "openai"
            openai = { base_url = "http://127.0.0.1:9/v1", model = "m", api_key_env = "KEY", max_tokens = 100 }
            "#,
        )
        .unwrap();
        let helper = catalog.pool("helper").unwrap();
        assert_eq!(helper.config().max, 4);
        assert_eq!(helper.config().acquire_timeout, Duration::from_millis(250));
        assert!(catalog.pool("slow").is_ok());
        assert!(catalog.pool("assistant").is_ok());
        assert!(catalog.pool("echo").is_ok(), "the built-in echo stays");
    }

    #[test]
    fn mistakes_are_named() {
        let error = parse("[agents.x]\nbackend = \"process\"\n").unwrap_err();
        assert!(
            error.contains("agent type x") && error.contains("program"),
            "{error}"
        );
        let error =
            parse("[agents.x]\nbackend = \"echo\"\npool = { min = 5, max = 2 }\n").unwrap_err();
        assert!(error.contains("min (5) is above max (2)"), "{error}");
        let error = parse("[agents.x]\nbackend = \"echo\"\ncolour = \"red\"\n").unwrap_err();
        assert!(error.contains("colour"), "{error}");
        let error = parse("[agents.x]\nbackend = \"telepathy\"\n").unwrap_err();
        assert!(error.contains("telepathy"), "{error}");
        let error = parse("[agents.x]\nbackend = \"echo\"\npool = { idle_timeout = \"soon\" }\n")
            .unwrap_err();
        assert!(error.contains("soon"), "{error}");
        let error = parse("[agents.\"bad name\"]\nbackend = \"echo\"\n").unwrap_err();
        assert!(error.contains("bad name"), "{error}");
    }
}
