//! One federation over loopback: a server and every centre's node in this process, the same endpoint and node
//! code as `fedslm server` and `fedslm client`, to the run's end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedslm_client::{Backoff, ClientError};
use fedslm_metrics::LogisticFit;
use fedslm_model::{save, ClinicalTable, ModelCard, ModelKind};
use fedslm_protocol::Finish;
use fedslm_server::evaluation::Evaluation;
use fedslm_server::{Outcome, Server, ServerConfig, ServerEvent};
use serde_json::json;
use tokio::task::JoinHandle;

use super::{configs, Simulation, StudyEvent};
use crate::runs::{checkpoint_writer, open_run_from_files};
use crate::{Context, StudyError};

/// Rounds of federated Newton for the clinical model: it converges in a few; the machine stops it there.
const NEWTON_ROUNDS: u32 = 30;

/// What one federation gave.
pub struct Federated {
    pub evaluation: Option<Evaluation>,
    /// The final model file.
    pub model: PathBuf,
    pub rounds: u32,
    pub fit: Option<LogisticFit>,
    pub audit_head: String,
    /// Under DP: the noise multiplier the server calibrated.
    pub noise_multiplier: Option<f64>,
}

/// The run id of a model's federation on fold `fold` (or on all training data): the key under which every
/// node keeps that run's evaluation scores for the paired tests.
pub fn run_id(model: ModelKind, fold: Option<u32>) -> String {
    match fold {
        Some(f) => format!("simulate-{model}-fold-{}", f + 1),
        None => format!("simulate-{model}-all"),
    }
}

/// Every node connected to `addr` until the server tells it the run is over.
pub fn start_nodes(
    ctx: &Simulation,
    addr: SocketAddr,
) -> Result<Vec<JoinHandle<Result<Finish, ClientError>>>, StudyError> {
    let mut clients = Vec::new();
    for (name, node) in &ctx.nodes {
        // The node holds its cohort and ledger; this run's configuration says where to connect, and its
        // Hello states the site's policy.
        let mut config = configs::client_config(&ctx.out, &ctx.pki, name, None, addr)?;
        if let Some(epsilon) = ctx.settings.dp_epsilon {
            config.privacy = super::privacy::policy(epsilon);
        }
        // A training site asks that nothing of its own leaves it in the clear; the validating centre's
        // evaluation, alone on its side, is its own figure.
        let training = ctx
            .centers
            .iter()
            .any(|(c, r)| c == name && *r == fedslm_protocol::Role::Train);
        config.privacy.require_secure_aggregation = ctx.settings.secure_aggregation && training;
        // The Hello states the preprocessing the node uses.
        config.preprocess = ctx.net().settings()?.1;
        let node = node.clone();
        let counts = node.counts();
        clients.push(tokio::spawn(async move {
            let backoff = Backoff {
                attempts: Some(5),
                ..Backoff::default()
            };
            fedslm_client::run(&config, counts, node, backoff, |_| {}).await
        }));
    }
    Ok(clients)
}

/// Waits for every node; a node that ended with an error is logged (the server's outcome says what counts),
/// and the errors are returned.
pub async fn join_nodes(clients: Vec<JoinHandle<Result<Finish, ClientError>>>) -> Vec<String> {
    let mut errors = Vec::new();
    for c in clients {
        if let Ok(Err(e)) = c.await {
            tracing::warn!(error = %e, "a node ended with an error");
            errors.push(e.to_string());
        }
    }
    errors
}

/// One federation of `model` from the initial model file `init`, on fold `fold` (or all training data).
pub fn federate(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    model: ModelKind,
    init: &Path,
    fold: Option<u32>,
) -> Result<Federated, StudyError> {
    let s = &ctx.settings;
    let tag = fold.map_or("all".to_string(), |f| format!("fold-{}", f + 1));
    let dir = ctx.out.join("runs").join(model.name()).join(&tag);
    crate::error::create_dir(&dir)?;
    let rounds = match (model, s.dp_epsilon) {
        (ModelKind::Clinical, None) => NEWTON_ROUNDS,
        (ModelKind::Clinical, Some(_)) => super::privacy::DP_NEWTON_ROUNDS,
        _ => s.rounds,
    };

    let config: ServerConfig =
        configs::server_config(&ctx.pki, &run_id(model, fold), &dir, &ctx.centers, |t| {
            t.initial_model = Some(init.to_path_buf());
            t.rounds = rounds;
            t.local_epochs = s.local_epochs;
            t.round_start_grace_secs = 30;
            t.evaluation_bins = s.bins;
            t.seed = s.training_seed();
            t.adapt_batch_norm = s.shift.adapt_batch_norm;
            t.fedbn = s.shift.fedbn;
            t.secure_aggregation = s.secure_aggregation;
            if let Some(f) = fold {
                t.cv_fold = Some(f);
                t.cv_folds = Some(s.folds);
            }
            if let Some(epsilon) = s.dp_epsilon {
                t.privacy = super::privacy::server_privacy(epsilon);
            }
        })?;
    let settings = config
        .round_settings(model)
        .map_err(|e| StudyError::Failed(format!("{model}: {e}")))?;
    let label = format!(
        "{model} {}",
        fold.map_or("all data".to_string(), |f| format!(
            "fold {}/{}",
            f + 1,
            s.folds
        ))
    );
    let Driven {
        outcome,
        evaluation,
        store,
        card,
    } = drive(ctx, runtime, config, init, &label, rounds)?;
    if let Some(e) = &evaluation {
        (ctx.observer)(StudyEvent::Milestone(format!("{label}: {}", e.summary())));
    }
    match outcome {
        Some(Outcome::Completed {
            rounds,
            weights,
            fit,
        }) => {
            let path = dir.join(format!("{model}.safetensors"));
            let record = evaluation.as_ref().map(Evaluation::record);
            let mut final_card = ModelCard {
                training: json!({
                    "software": concat!("fedslm ", env!("CARGO_PKG_VERSION")),
                    "mode": "federated (simulation)",
                    "rounds": rounds,
                    "fold": fold,
                    "folds": s.folds,
                    "seed": s.training_seed(),
                    "centers": ctx.centers.iter().map(|(c, r)| format!("{c} ({r})")).collect::<Vec<_>>(),
                    "audit_head": store.head().hex(),
                    "policies": crate::runs::policies(&store)?,
                    "privacy": crate::runs::privacy(&store, &settings)?,
                }),
                metrics: record
                    .map(|r| json!({"internal": r.internal, "external": r.external}))
                    .unwrap_or_default(),
                ..card
            };
            if let Some(fit) = &fit {
                final_card.clinical = Some(ClinicalTable::from_fit(fit));
                final_card.training["patients"] = json!(fit.n);
            }
            save(&path, &weights, &final_card).context(|| label.clone())?;
            Ok(Federated {
                evaluation,
                model: path,
                rounds,
                fit,
                audit_head: store.head().hex(),
                noise_multiplier: settings.dp.map(|d| d.noise_multiplier),
            })
        }
        Some(Outcome::Failed { rounds, reason }) => Err(StudyError::Failed(format!(
            "{label}: the federation failed after {rounds} rounds: {reason}"
        ))),
        None => Err(StudyError::Failed(format!(
            "{label}: the federation stopped"
        ))),
    }
}

/// What driving one federation gave: the server's outcome, its evaluation, its store and the initial
/// model's card.
pub struct Driven {
    pub outcome: Option<Outcome>,
    pub evaluation: Option<Evaluation>,
    pub store: Arc<fedslm_server::store::Store>,
    pub card: ModelCard,
}

/// One federation from `init` with `config`, named `label` to whoever watches: a server on loopback and every
/// centre's node, to the run's end (or until every node is gone).
pub fn drive(
    ctx: &Simulation,
    runtime: &tokio::runtime::Runtime,
    config: ServerConfig,
    init: &Path,
    label: &str,
    rounds: u32,
) -> Result<Driven, StudyError> {
    let (run, card) = open_run_from_files(&config, init, false)?;
    (ctx.observer)(StudyEvent::FederationStarted { label, rounds });
    let store = run.store.clone();
    let (outcome, evaluation) = runtime.block_on(async {
        let server = Arc::new(Server::bind(config)?);
        let addr = server.local_addr()?;
        let mut events = server.subscribe();
        let writer = checkpoint_writer(card.clone());
        let s = server.clone();
        let (coordinator, run_store) = (run.coordinator, run.store.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_task = tokio::spawn(async move {
            s.run_rounds(coordinator, run_store, writer, async {
                let _ = stopped.await;
            })
            .await
        });
        // Every node gone before the run ended (each refused, say): nobody is left to finish it.
        let mut nodes = tokio::spawn(join_nodes(start_nodes(ctx, addr)?));
        let mut evaluation = None;
        let mut nodes_gone = None;
        let mut heard = |event: ServerEvent| match event {
            ServerEvent::RoundCommitted(r) => (ctx.observer)(StudyEvent::RoundCommitted {
                label,
                round: r.round,
                summary: r.summary(),
            }),
            ServerEvent::Evaluated(e) => evaluation = Some(e),
            _ => {}
        };
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(ServerEvent::Finished(_)) | Err(_) => break,
                    Ok(event) => heard(event),
                },
                errors = &mut nodes, if nodes_gone.is_none() => {
                    // The nodes also end after a run's Finish: the server's outcome tells which.
                    nodes_gone = Some(errors.unwrap_or_default());
                    let _ = stop.send(());
                    break;
                }
            }
        }
        let outcome = server_task
            .await
            .map_err(|e| StudyError::Failed(format!("{label}: the server stopped: {e}")))?;
        while let Ok(event) = events.try_recv() {
            heard(event);
        }
        match (&outcome, nodes_gone) {
            (None, Some(errors)) => {
                return Err(StudyError::Failed(format!(
                    "{label}: every node ended before the run did: {}",
                    if errors.is_empty() {
                        "no error".to_string()
                    } else {
                        errors.join("; ")
                    }
                )))
            }
            (_, Some(_)) => {}
            (_, None) => {
                let _ = nodes.await;
            }
        }
        Ok::<_, StudyError>((outcome, evaluation))
    })?;
    (ctx.observer)(StudyEvent::FederationEnded { label });
    Ok(Driven {
        outcome,
        evaluation,
        store,
        card,
    })
}
