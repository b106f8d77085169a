//! The process backend against real programs: the Python example agent, and programs that
//! misbehave.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_agents::{AgentError, AgentFactory, AgentPool, PoolConfig, ProcessConfig};
use switchyard_core::{ContextMessage, Role};
use tokio::sync::mpsc;

fn python() -> Option<&'static str> {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: python3 is not installed; the process agent tests did not run"
        );
    }
    found.then_some("python3")
}

fn config(program: &str, args: &[&str]) -> ProcessConfig {
    ProcessConfig {
        agent_type: "py-echo".to_string(),
        program: program.to_string(),
        args: args.iter().map(ToString::to_string).collect(),
        env: Vec::new(),
        ready_timeout: Duration::from_secs(10),
    }
}

fn example() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/agents/echo_agent.py"
    )
    .to_string()
}

fn context(content: &str) -> Vec<ContextMessage> {
    vec![
        ContextMessage {
            seq: 1,
            role: Role::System,
            content: "be an echo".into(),
            name: String::new(),
            created_at: SystemTime::now(),
        },
        ContextMessage {
            seq: 2,
            role: Role::User,
            content: content.into(),
            name: String::new(),
            created_at: SystemTime::now(),
        },
    ]
}

async fn run(
    agent: &mut dyn switchyard_agents::Agent,
    content: &str,
) -> (Result<switchyard_agents::Usage, AgentError>, Vec<String>) {
    let (sender, mut receiver) = mpsc::channel(64);
    let result = agent.run_turn(&context(content), &sender).await;
    drop(sender);
    let mut deltas = Vec::new();
    while let Some(delta) = receiver.recv().await {
        deltas.push(delta);
    }
    (result, deltas)
}

#[tokio::test]
async fn the_python_example_streams_a_reply_and_survives_a_reset() {
    let Some(python) = python() else { return };
    let mut agent = config(python, &[&example()]).create().await.unwrap();
    let (usage, deltas) = run(agent.as_mut(), "hello from rust").await;
    let usage = usage.unwrap();
    assert_eq!(deltas.concat(), "echo: hello from rust");
    assert!(deltas.len() >= 3, "{deltas:?}");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (6, 4));
    agent.reset().await;
    assert!(!agent.is_broken());
    let (_, deltas) = run(agent.as_mut(), "again").await;
    assert_eq!(deltas.concat(), "echo: again");
}

#[tokio::test]
async fn a_program_that_cannot_start_or_is_never_ready_is_refused() {
    let missing = config("/nonexistent/agent", &[]).create().await;
    let Err(AgentError::Backend(message)) = missing else {
        panic!("a missing program must fail")
    };
    assert!(message.contains("/nonexistent/agent"), "{message}");

    let Some(python) = python() else { return };
    let mut silent = config(python, &["-c", "import time; time.sleep(30)"]);
    silent.ready_timeout = Duration::from_millis(300);
    let Err(AgentError::Backend(message)) = silent.create().await else {
        panic!("never ready")
    };
    assert!(message.contains("not ready"), "{message}");

    let exits = config(python, &["-c", "import sys; sys.exit(3)"]);
    let Err(AgentError::Backend(message)) = exits.create().await else {
        panic!("exits at once")
    };
    assert!(message.contains("exited"), "{message}");
}

#[tokio::test]
async fn a_process_that_dies_mid_turn_is_discarded_by_its_pool() {
    let Some(python) = python() else { return };
    // Ready, then dies on its first turn.
    let script = "import sys, json\nprint(json.dumps({'type': 'ready'}), flush=True)\nsys.stdin.readline()\nsys.exit(1)\n";
    let pool = AgentPool::new(
        "dies",
        Arc::new(config(python, &["-c", script])),
        PoolConfig {
            max: 1,
            ..PoolConfig::default()
        },
    );
    let mut agent = pool.acquire().await.unwrap();
    let (result, _) = run(agent.agent(), "hi").await;
    assert!(
        matches!(result, Err(AgentError::Backend(ref message)) if message.contains("exited")),
        "{result:?}"
    );
    agent.release().await;
    assert_eq!(pool.stats().live, 0, "the broken instance is not kept");

    // A non-fatal error keeps the instance.
    let script = "import sys, json\nprint(json.dumps({'type': 'ready'}), flush=True)\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['type'] == 'turn':\n        print(json.dumps({'type': 'error', 'id': m['id'], 'message': 'no model', 'fatal': False}), flush=True)\n    else:\n        print(json.dumps({'type': 'ready'}), flush=True)\n";
    let pool = AgentPool::new(
        "fails",
        Arc::new(config(python, &["-c", script])),
        PoolConfig::default(),
    );
    let mut agent = pool.acquire().await.unwrap();
    let (result, _) = run(agent.agent(), "hi").await;
    assert!(
        matches!(result, Err(AgentError::Failed(ref message)) if message == "no model"),
        "{result:?}"
    );
    agent.release().await;
    assert_eq!(
        pool.stats().idle,
        1,
        "a sound instance goes back to the pool"
    );
}

/// Whether langchain-core is importable; a note (or, where tests/run.sh installed it and
/// set SWITCHYARD_REQUIRE_LANGCHAIN, a failure) when it is not.
fn langchain(python: &str) -> bool {
    let found = std::process::Command::new(python)
        .args(["-c", "import langchain_core"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_LANGCHAIN").is_none(),
            "langchain-core is required (SWITCHYARD_REQUIRE_LANGCHAIN is set) but not importable"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: langchain-core is not installed; the LangChain adapter test did not run"
        );
    }
    found
}

#[tokio::test]
async fn the_langchain_adapter_hosts_a_langchain_runnable() {
    let Some(python) = python() else { return };
    if !langchain(python) {
        return;
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/agents");
    let mut config = config(
        python,
        &[
            &format!("{examples}/langchain_adapter.py"),
            "langchain_echo:build",
        ],
    );
    config.env = vec![("PYTHONPATH".to_string(), examples.to_string())];
    let mut agent = config.create().await.unwrap();
    let (usage, deltas) = run(agent.as_mut(), "from a langchain runnable").await;
    assert!(usage.is_ok(), "{usage:?}");
    assert_eq!(deltas.concat(), "echo: from a langchain runnable");
    assert!(deltas.len() >= 3, "streamed, not collected: {deltas:?}");
    agent.reset().await;
    assert!(!agent.is_broken());
    let (_, deltas) = run(agent.as_mut(), "again").await;
    assert_eq!(deltas.concat(), "echo: again");
}

#[tokio::test]
async fn a_runaway_line_breaks_the_instance_instead_of_the_worker() {
    let Some(python) = python() else { return };
    let script = "import sys, json\nprint(json.dumps({'type': 'ready'}), flush=True)\nsys.stdin.readline()\nsys.stdout.write('x' * (3 * 1024 * 1024))\nsys.stdout.flush()\n";
    let mut agent = config(python, &["-c", script]).create().await.unwrap();
    let (result, _) = run(agent.as_mut(), "hi").await;
    assert!(
        matches!(result, Err(AgentError::Backend(ref message)) if message.contains("longer than")),
        "{result:?}"
    );
    assert!(agent.is_broken());
}
