//! Dev clusters that differ in one thing, measured in turn, round after round, so machine
//! noise falls on all alike; the first is the baseline.
//!
//! - `--security`: what API keys and TLS cost a routed call (no keys and plaintext, API
//!   keys, API keys and TLS);
//! - `--quotas`: what quotas and rate limits cost (none, every resource limited and both
//!   rate limits on, with limits never reached);
//! - `--encryption`: what sealing contexts at rest costs (plaintext, sealed).

use std::sync::Arc;

use std::time::Duration;
use switchyard::SwitchyardClient;
use switchyard_coordinator::{ApiKeyRegistry, CallerAuth};
use switchyard_core::api_key::hash_api_key;

use switchyard_core::quota::Resource;
use switchyard_core::{ApiKey, ApiKeys, Scope};
use switchyard_store::sealing::{Kek, KeyRing};
use switchyard_worker::quotas::{Limit, QuotaConfig, RateLimit};

use super::load::{LoadShape, Outcome};
use super::{BenchArgs, BoxError, connect, measure, micros, prepare, start_cluster_with};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    Plain,
    Keys,
    KeysAndTls,
    Quotas,
    Sealed,
}

impl Variant {
    pub(super) const SECURITY: [Variant; 3] = [Variant::Plain, Variant::Keys, Variant::KeysAndTls];
    pub(super) const QUOTAS: [Variant; 2] = [Variant::Plain, Variant::Quotas];
    pub(super) const ENCRYPTION: [Variant; 2] = [Variant::Plain, Variant::Sealed];

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Keys => "API keys",
            Variant::KeysAndTls => "API keys and TLS",
            Variant::Quotas => "quotas and rates on",
            Variant::Sealed => "encrypted at rest",
        }
    }
}

/// Every resource limited, and both rate limits on, far above what a bench can use: the
/// cost of checking, not of refusing.
fn unreachable_quotas() -> QuotaConfig {
    let never = |window: Duration| Limit {
        limit: 1e15,
        window,
    };
    QuotaConfig {
        defaults: Resource::ALL
            .into_iter()
            .map(|resource| {
                let window = if resource.is_windowed() {
                    Duration::from_secs(3600)
                } else {
                    Duration::ZERO
                };
                (resource, never(window))
            })
            .collect(),
        user_rate: Some(RateLimit {
            count: 1_000_000,
            period: Duration::from_secs(1),
            burst: 1_000_000,
        }),
        session_rate: Some(RateLimit {
            count: 1_000_000,
            period: Duration::from_secs(1),
            burst: 1_000_000,
        }),
        ..QuotaConfig::default()
    }
}

const BENCH_KEY: &str = "sy_bench-key-0123456789abcdef0123456789abcdef";

pub(super) async fn run(
    args: &BenchArgs,
    shape: LoadShape,
    variants: &[Variant],
) -> Result<(), BoxError> {
    let scenario = args.scenario[0];
    let mut outcomes: Vec<Vec<Outcome>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (index, variant) in variants.iter().copied().enumerate() {
            if !args.json {
                eprintln!("  round {round}/{}: {}", args.rounds, variant.name());
            }
            outcomes[index].push(measure_variant(args, shape.clone(), scenario, variant).await?);
        }
    }
    report(args, scenario.name(), variants, &outcomes);
    Ok(())
}

async fn measure_variant(
    args: &BenchArgs,
    shape: LoadShape,
    scenario: super::Scenario,
    variant: Variant,
) -> Result<Outcome, BoxError> {
    let tls_dir = std::env::temp_dir().join(format!("switchyard-bench-tls-{}", std::process::id()));
    let tls = match variant {
        Variant::KeysAndTls => Some(crate::tls::load_or_create(
            &tls_dir,
            std::net::IpAddr::from([127, 0, 0, 1]),
        )?),
        _ => None,
    };
    let keys = (variant == Variant::Sealed).then(|| {
        KeyRing::new(
            Kek::from_secret(b"the benchmark's key-encryption key, 32 bytes+")
                .expect("a long enough secret"),
            Vec::new(),
        )
    });
    let (cluster, data_dir) = start_cluster_with(args, keys, |config| {
        if variant == Variant::Quotas {
            config.quotas = unreachable_quotas();
        }
        if matches!(variant, Variant::Keys | Variant::KeysAndTls) {
            let keys = ApiKeys::new(vec![ApiKey {
                name: "bench".into(),
                hash: hash_api_key(BENCH_KEY),
                scopes: vec![Scope::Sessions],
                user_prefix: Some("bench-".into()),
            }])?;
            config.callers = CallerAuth::ApiKeys(ApiKeyRegistry::fixed(keys));
        }
        config.tls = tls.clone();
        Ok(())
    })
    .await?;
    let url = cluster.coordinator_url();
    let mut client = match &tls {
        Some(tls) => SwitchyardClient::connect_tls(url.clone(), &tls.ca).await?,
        None => SwitchyardClient::new(connect(&url).await?),
    };
    if matches!(variant, Variant::Keys | Variant::KeysAndTls) {
        client = client.with_api_key(BENCH_KEY)?;
    }
    let sessions = Arc::new(prepare(&client, args).await?);
    let mut outcome = measure(scenario, args, shape, client, sessions).await;
    outcome.label = variant.name().to_string();
    cluster.stop().await;
    if let Some(dir) = data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(&tls_dir);
    Ok(outcome)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(args: &BenchArgs, scenario: &str, variants: &[Variant], outcomes: &[Vec<Outcome>]) {
    let summary: Vec<(f64, f64, f64, u64)> = outcomes
        .iter()
        .map(|rounds| {
            (
                median(rounds.iter().map(Outcome::throughput).collect()),
                median(
                    rounds
                        .iter()
                        .map(|outcome| outcome.quantile_us(0.5))
                        .collect(),
                ),
                median(
                    rounds
                        .iter()
                        .map(|outcome| outcome.quantile_us(0.99))
                        .collect(),
                ),
                rounds
                    .iter()
                    .map(|outcome| outcome.errors.values().sum::<u64>())
                    .sum(),
            )
        })
        .collect();
    let (base_throughput, base_p50, _, _) = summary[0];
    if args.json {
        let variants: Vec<serde_json::Value> = variants
            .iter()
            .zip(&summary)
            .map(|(variant, (throughput, p50, p99, errors))| {
                serde_json::json!({
                    "variant": variant.name(),
                    "median_throughput_per_second": throughput,
                    "median_p50_us": p50,
                    "median_p99_us": p99,
                    "errors": errors,
                    "throughput_ratio": throughput / base_throughput.max(1e-9),
                    "p50_ratio": p50 / base_p50.max(1e-9),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "scenario": scenario,
                "rounds": args.rounds,
                "concurrency": args.concurrency,
                "variants": variants,
            })
        );
        return;
    }
    println!();
    println!(
        "{scenario}, medians of {} rounds, concurrency {}, {} workers, store {}",
        args.rounds, args.concurrency, args.workers, args.store
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>8} {:>12} {:>10}",
        "", "calls/s", "p50", "p99", "errors", "× plain/s", "× plain p50"
    );
    for (variant, (throughput, p50, p99, errors)) in variants.iter().zip(&summary) {
        println!(
            "{:<22} {:>10.0} {:>10} {:>10} {:>8} {:>12.3} {:>10.3}",
            variant.name(),
            throughput,
            micros(*p50),
            micros(*p99),
            errors,
            throughput / base_throughput.max(1e-9),
            p50 / base_p50.max(1e-9)
        );
    }
}
