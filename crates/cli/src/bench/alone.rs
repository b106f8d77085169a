//! The agent of a first-delta run, run directly in this process: its own time to a first
//! delta, at the same concurrency, on a context like the sessions' (their prepared messages
//! and the turn's own). What a turn through the cluster takes beyond it is what Switchyard
//! adds. With the fixed-delay model, both leave out the time the model held each request
//! (its first delta states it), so neither its delay nor how late its timer fired under
//! load is counted as Switchyard's.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use switchyard_agents::AgentPool;
use switchyard_core::{ContextMessage, Role};
use tokio::sync::mpsc;
use tonic::Status;

use super::BenchArgs;
use super::llm::less_model_time;
use super::load::{self, LoadShape, Outcome};

pub(super) async fn first_delta(args: &BenchArgs, shape: LoadShape, pool: AgentPool) -> Outcome {
    let content = "x".repeat(args.message_size as usize);
    let context: Arc<Vec<ContextMessage>> = Arc::new(
        (1..=u64::from(args.context_messages) + 1)
            .map(|seq| ContextMessage {
                seq,
                role: Role::User,
                content: content.clone(),
                name: String::new(),
                created_at: SystemTime::now(),
            })
            .collect(),
    );
    let label = format!("{} alone", args.agent_type);
    load::run(&label, shape, move |_| {
        let (pool, context) = (pool.clone(), context.clone());
        async move {
            let called = Instant::now();
            let mut agent = pool
                .acquire()
                .await
                .map_err(|error| Status::resource_exhausted(error.to_string()))?;
            let (deltas, mut receiver) = mpsc::channel::<String>(32);
            let first = async move {
                let first = receiver
                    .recv()
                    .await
                    .map(|text| less_model_time(called.elapsed(), &text));
                while receiver.recv().await.is_some() {}
                first
            };
            let run = async {
                let result = agent.agent().run_turn(&context, &deltas).await;
                drop(deltas);
                result
            };
            let (result, first) = tokio::join!(run, first);
            match result {
                Ok(_) => agent.release().await,
                Err(error) => {
                    agent.discard();
                    return Err(Status::internal(error.to_string()));
                }
            }
            Ok(Some(first.unwrap_or_else(|| called.elapsed())))
        }
    })
    .await
}
