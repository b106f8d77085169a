//! `AgentPool`: instances of one agent type, shared by every session on a worker.
//!
//! - Acquire takes an idle instance, or creates one at once while the pool is under `max`
//!   (it never waits when it could create), or else waits, first come first served, until an
//!   instance is released or `acquire_timeout` passes.
//! - Release resets the instance and hands it to the oldest waiter, or keeps it idle.
//! - Idle instances above `min` are reaped after `idle_timeout`; a reaped instance is gone
//!   from the pool before anyone else can see it, so it is never handed out again.
//! - A broken instance (its process died, its backend failed fatally) is discarded, never
//!   reused; a waiter then gets a new one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use switchyard_core::ContextWindow;

use crate::{Agent, AgentError, AgentFactory};

/// Sizes and timeouts of one agent type's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Instances kept warm even when idle.
    pub min: usize,
    /// Instances at most, busy and idle together.
    pub max: usize,
    /// An idle instance above `min` is dropped after this long.
    pub idle_timeout: Duration,
    /// How long an acquire waits for an instance when the pool is at `max`.
    pub acquire_timeout: Duration,
    /// How long one turn may run; past it the instance is stopped and replaced, and the
    /// turn ends DEADLINE_EXCEEDED.
    pub turn_timeout: Duration,
    /// How much of a session's context a turn sends an instance.
    pub context_window: ContextWindow,
    /// The most tokens a reply is expected to take: a turn reserves this much of the user's
    /// `tokens` quota (beside its prompt) before it runs, and settles to the real usage after.
    pub max_reply_tokens: u64,
    /// What the type's tokens cost, for the `cost_usd` quota.
    pub price: TokenPrice,
    /// A session whose turn p95 is above this is slow: its health score drops, and a
    /// `slow_turns` alert is raised.
    pub slow_turn: Duration,
}

/// US dollars per 1 000 tokens of prompt and of completion.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenPrice {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

impl TokenPrice {
    /// The cost of `prompt` and `completion` tokens.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.prompt_per_1k + completion as f64 * self.completion_per_1k) / 1000.0
    }
}

/// The slow-turn threshold of an agent type that names none.
pub const DEFAULT_SLOW_TURN: Duration = Duration::from_secs(30);

/// The reply tokens a turn reserves when its agent type names none.
pub const DEFAULT_MAX_REPLY_TOKENS: u64 = 1024;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: 0,
            max: 16,
            idle_timeout: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(10),
            turn_timeout: Duration::from_secs(5 * 60),
            context_window: ContextWindow::default(),
            max_reply_tokens: DEFAULT_MAX_REPLY_TOKENS,
            price: TokenPrice::default(),
            slow_turn: DEFAULT_SLOW_TURN,
        }
    }
}

impl PoolConfig {
    pub fn validate(&self, agent_type: &str) -> Result<(), String> {
        if self.max == 0 {
            return Err(format!(
                "agent type {agent_type}: pool max must be at least 1"
            ));
        }
        if self.min > self.max {
            return Err(format!(
                "agent type {agent_type}: pool min ({}) is above max ({})",
                self.min, self.max
            ));
        }
        if self.context_window.max_messages == 0 || self.context_window.max_bytes == 0 {
            return Err(format!(
                "agent type {agent_type}: the context window must hold at least one message and one byte"
            ));
        }
        if self.turn_timeout.is_zero() {
            return Err(format!(
                "agent type {agent_type}: turn_timeout must be longer than 0"
            ));
        }
        if self.slow_turn.is_zero() {
            return Err(format!(
                "agent type {agent_type}: slow_turn must be longer than 0"
            ));
        }
        for (field, price) in [
            ("price.prompt_per_1k", self.price.prompt_per_1k),
            ("price.completion_per_1k", self.price.completion_per_1k),
        ] {
            if !price.is_finite() || price < 0.0 {
                return Err(format!(
                    "agent type {agent_type}: {field} must be a number of dollars, 0 or more"
                ));
            }
        }
        Ok(())
    }
}

struct IdleAgent {
    agent: Box<dyn Agent>,
    since: Instant,
}

struct PoolState {
    idle: Vec<IdleAgent>,
    /// Instances alive: idle, in use, or being created.
    live: usize,
    waiters: VecDeque<oneshot::Sender<Box<dyn Agent>>>,
}

struct PoolInner {
    agent_type: String,
    factory: Arc<dyn AgentFactory>,
    config: PoolConfig,
    state: Mutex<PoolState>,
}

impl PoolInner {
    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives a ready instance to the oldest waiter still waiting, or keeps it idle.
    fn put_back(&self, mut agent: Box<dyn Agent>) {
        let mut state = self.state();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(agent) {
                Ok(()) => return,
                // That waiter gave up; try the next one.
                Err(returned) => agent = returned,
            }
        }
        state.idle.push(IdleAgent {
            agent,
            since: Instant::now(),
        });
    }

    /// An instance left the pool for good: if someone waits, make them a new one.
    fn forget_one(self: &Arc<Self>) {
        let mut state = self.state();
        state.live -= 1;
        state.waiters.retain(|waiter| !waiter.is_closed());
        if state.waiters.is_empty() || state.live >= self.config.max {
            return;
        }
        state.live += 1;
        drop(state);
        let pool = self.clone();
        tokio::spawn(async move {
            match pool.factory.create().await {
                Ok(agent) => pool.put_back(agent),
                Err(error) => {
                    tracing::warn!(agent_type = %pool.agent_type, %error, "cannot create an agent instance");
                    pool.state().live -= 1;
                }
            }
        });
    }
}

/// The pool of one agent type. Cloning is cheap; clones share the pool.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<PoolInner>,
}

/// Figures of a pool, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub live: usize,
    pub idle: usize,
    pub waiting: usize,
}

impl AgentPool {
    pub fn new(
        agent_type: impl Into<String>,
        factory: Arc<dyn AgentFactory>,
        config: PoolConfig,
    ) -> Self {
        AgentPool {
            inner: Arc::new(PoolInner {
                agent_type: agent_type.into(),
                factory,
                config,
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    live: 0,
                    waiters: VecDeque::new(),
                }),
            }),
        }
    }

    pub fn agent_type(&self) -> &str {
        &self.inner.agent_type
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.inner.state();
        PoolStats {
            live: state.live,
            idle: state.idle.len(),
            waiting: state
                .waiters
                .iter()
                .filter(|waiter| !waiter.is_closed())
                .count(),
        }
    }

    /// An instance for one turn: idle, new, or the next one released.
    pub async fn acquire(&self) -> Result<PooledAgent, AgentError> {
        let started = Instant::now();
        let waiting = {
            let mut state = self.inner.state();
            if let Some(idle) = state.idle.pop() {
                return Ok(self.lend(idle.agent, false));
            }
            if state.live < self.inner.config.max {
                state.live += 1;
                None
            } else {
                let (sender, receiver) = oneshot::channel();
                state.waiters.push_back(sender);
                Some(receiver)
            }
        };
        let Some(receiver) = waiting else {
            return match self.inner.factory.create().await {
                Ok(agent) => Ok(self.lend(agent, false)),
                Err(error) => {
                    self.inner.forget_one();
                    Err(error)
                }
            };
        };
        match tokio::time::timeout(self.inner.config.acquire_timeout, receiver).await {
            Ok(Ok(agent)) => Ok(self.lend(agent, true)),
            _ => {
                // Out of the queue at once, not when an instance is next released.
                self.inner
                    .state()
                    .waiters
                    .retain(|waiter| !waiter.is_closed());
                Err(AgentError::PoolExhausted {
                    agent_type: self.inner.agent_type.clone(),
                    waited: started.elapsed(),
                    max: self.inner.config.max,
                })
            }
        }
    }

    fn lend(&self, agent: Box<dyn Agent>, waited: bool) -> PooledAgent {
        PooledAgent {
            agent: Some(agent),
            pool: self.inner.clone(),
            waited,
        }
    }

    /// Creates instances until `min` are alive.
    pub async fn fill_to_min(&self) -> Result<(), AgentError> {
        loop {
            {
                let mut state = self.inner.state();
                if state.live >= self.inner.config.min {
                    return Ok(());
                }
                state.live += 1;
            }
            match self.inner.factory.create().await {
                Ok(agent) => self.inner.put_back(agent),
                Err(error) => {
                    self.inner.state().live -= 1;
                    return Err(error);
                }
            }
        }
    }

    /// Drops instances idle for longer than the idle timeout while more than `min` are
    /// alive. Returns how many went.
    pub fn reap_idle(&self) -> usize {
        let now = Instant::now();
        let idle_timeout = self.inner.config.idle_timeout;
        let min = self.inner.config.min;
        let reaped: Vec<IdleAgent> = {
            let mut state = self.inner.state();
            let mut reaped = Vec::new();
            // Oldest first: `idle` is pushed in release order.
            let mut index = 0;
            while index < state.idle.len() {
                if state.live > min && now.duration_since(state.idle[index].since) >= idle_timeout {
                    reaped.push(state.idle.remove(index));
                    state.live -= 1;
                } else {
                    index += 1;
                }
            }
            reaped
        };
        let count = reaped.len();
        if count > 0 {
            tracing::debug!(agent_type = %self.inner.agent_type, count, "idle agent instances reaped");
        }
        // Dropped outside the lock: a process agent's drop may stop its child.
        drop(reaped);
        count
    }
}

/// An instance lent for one turn. Give it back with [`PooledAgent::release`] (which resets
/// it) or [`PooledAgent::discard`] if it broke; dropped without either, it is discarded,
/// since nothing reset it.
pub struct PooledAgent {
    agent: Option<Box<dyn Agent>>,
    pool: Arc<PoolInner>,
    /// The pool was at its max with none idle: the acquire queued for a released instance.
    waited: bool,
}

impl PooledAgent {
    /// Whether this instance was had only by waiting for another turn to release it.
    pub fn waited(&self) -> bool {
        self.waited
    }

    pub fn agent(&mut self) -> &mut dyn Agent {
        self.agent.as_deref_mut().expect("present until released")
    }

    /// Resets the instance and returns it to the pool.
    pub async fn release(mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.reset().await;
            if agent.is_broken() {
                tracing::warn!(agent_type = %self.pool.agent_type, "agent instance broke and was discarded");
                drop(agent);
                self.pool.forget_one();
                return;
            }
            self.pool.put_back(agent);
        }
    }

    /// Drops a broken instance; the pool makes a new one for the next acquire.
    pub fn discard(mut self) {
        if let Some(agent) = self.agent.take() {
            tracing::warn!(agent_type = %self.pool.agent_type, "agent instance discarded as broken");
            drop(agent);
            self.pool.forget_one();
        }
    }
}

impl Drop for PooledAgent {
    fn drop(&mut self) {
        if self.agent.take().is_some() {
            self.pool.forget_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use switchyard_core::ContextMessage;
    use tokio::sync::mpsc;

    use super::*;
    use crate::Usage;

    /// Counts instances made and resets done; each instance knows its number.
    #[derive(Default)]
    struct Counting {
        created: AtomicUsize,
        resets: Arc<AtomicUsize>,
    }

    struct Numbered {
        number: usize,
        resets: Arc<AtomicUsize>,
        dirty: bool,
    }

    #[async_trait]
    impl Agent for Numbered {
        async fn run_turn(
            &mut self,
            _: &[ContextMessage],
            deltas: &mpsc::Sender<String>,
        ) -> Result<Usage, AgentError> {
            self.dirty = true;
            let _ = deltas.send(self.number.to_string()).await;
            Ok(Usage::default())
        }

        async fn reset(&mut self) {
            self.dirty = false;
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl AgentFactory for Counting {
        async fn create(&self) -> Result<Box<dyn Agent>, AgentError> {
            let number = self.created.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Numbered {
                number,
                resets: self.resets.clone(),
                dirty: false,
            }))
        }
    }

    fn pool(min: usize, max: usize) -> (AgentPool, Arc<Counting>) {
        let factory = Arc::new(Counting::default());
        let config = PoolConfig {
            min,
            max,
            idle_timeout: Duration::from_secs(60),
            acquire_timeout: Duration::from_secs(5),
            ..PoolConfig::default()
        };
        (AgentPool::new("test", factory.clone(), config), factory)
    }

    async fn number_of(agent: &mut PooledAgent) -> usize {
        let (sender, mut receiver) = mpsc::channel(1);
        agent.agent().run_turn(&[], &sender).await.unwrap();
        receiver.recv().await.unwrap().parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn below_max_an_acquire_never_waits() {
        let (pool, factory) = pool(0, 3);
        let started = Instant::now();
        let held: Vec<PooledAgent> = futures_join(&pool, 3).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "created at once, no waiting"
        );
        assert_eq!(factory.created.load(Ordering::SeqCst), 3);
        assert_eq!(
            pool.stats(),
            PoolStats {
                live: 3,
                idle: 0,
                waiting: 0
            }
        );
        drop(held);
    }

    async fn futures_join(pool: &AgentPool, count: usize) -> Vec<PooledAgent> {
        let mut held = Vec::new();
        for _ in 0..count {
            held.push(pool.acquire().await.unwrap());
        }
        held
    }

    #[tokio::test(start_paused = true)]
    async fn at_max_waiters_are_served_first_come_first_served() {
        let (pool, _) = pool(0, 1);
        let mut first = pool.acquire().await.unwrap();
        let number = number_of(&mut first).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for waiter in 0..3 {
            let pool = pool.clone();
            let order = order.clone();
            waiters.push(tokio::spawn(async move {
                let agent = pool.acquire().await.unwrap();
                order.lock().unwrap().push(waiter);
                tokio::time::sleep(Duration::from_millis(10)).await;
                agent.release().await;
            }));
            // Let each waiter queue before the next.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.stats().waiting, 3);
        first.release().await;
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        // The one instance served everyone, reset between turns.
        let mut again = pool.acquire().await.unwrap();
        assert_eq!(number_of(&mut again).await, number);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_acquire_says_how_long_it_waited() {
        let (pool, _) = pool(0, 1);
        let _held = pool.acquire().await.unwrap();
        let Err(error) = pool.acquire().await else {
            panic!("the pool is at max")
        };
        let AgentError::PoolExhausted { waited, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(*waited, Duration::from_secs(5));
        assert!(
            error.to_string().contains("5s") && error.to_string().contains("test"),
            "{error}"
        );
        assert_eq!(pool.stats().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn release_resets_and_idle_instances_above_min_are_reaped_for_good() {
        let (pool, factory) = pool(1, 3);
        pool.fill_to_min().await.unwrap();
        let held = futures_join(&pool, 3).await;
        for agent in held {
            agent.release().await;
        }
        assert_eq!(factory.resets.load(Ordering::SeqCst), 3);
        assert_eq!(
            pool.stats(),
            PoolStats {
                live: 3,
                idle: 3,
                waiting: 0
            }
        );

        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(pool.reap_idle(), 2, "down to min, not below");
        assert_eq!(
            pool.stats(),
            PoolStats {
                live: 1,
                idle: 1,
                waiting: 0
            }
        );

        // Only the survivor is ever handed out again; new ones are new.
        let mut seen = Vec::new();
        let held = futures_join(&pool, 3).await;
        for mut agent in held {
            seen.push(number_of(&mut agent).await);
            agent.release().await;
        }
        seen.sort_unstable();
        let survivors_and_new = seen.iter().filter(|n| **n >= 3).count();
        assert_eq!(survivors_and_new, 2, "two brand-new instances: {seen:?}");
        assert_eq!(factory.created.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_instance_is_never_reused() {
        let (pool, factory) = pool(0, 1);
        let mut broken = pool.acquire().await.unwrap();
        let broken_number = number_of(&mut broken).await;
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut agent = pool.acquire().await.unwrap();
                number_of(&mut agent).await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        broken.discard();
        let number = waiter.await.unwrap();
        assert_ne!(number, broken_number);
        assert_eq!(factory.created.load(Ordering::SeqCst), 2);

        // Dropped without release (nothing reset it): discarded too.
        let dropped = pool.acquire().await.unwrap();
        drop(dropped);
        assert_eq!(pool.stats().live, 0);
    }

    #[tokio::test]
    async fn waiters_that_time_out_leave_the_queue_at_once() {
        let pool = AgentPool::new(
            "test",
            Arc::new(Counting::default()),
            PoolConfig {
                max: 1,
                acquire_timeout: Duration::from_millis(20),
                ..PoolConfig::default()
            },
        );
        let held = pool.acquire().await.unwrap();
        for _ in 0..3 {
            assert!(matches!(
                pool.acquire().await,
                Err(AgentError::PoolExhausted { .. })
            ));
        }
        assert_eq!(pool.inner.state().waiters.len(), 0);
        held.release().await;
    }
}
