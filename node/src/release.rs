//! What this site releases, message by message: `fedslm client --dry-run` prints it before anything connects.

use fedslm_client::ClientConfig;
use fedslm_metrics::LogisticStats;
use fedslm_model::{clinical, NetConfig, Network};
use fedslm_protocol::clinical::newton_weights;
use fedslm_protocol::{codec, FitResult, Limits, Message, ModelKind, Weights};

use crate::{NodeError, SiteCohort};

/// One kind of message the site sends, with its encoded size.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// When it is sent ("once per connection", "each round, ...").
    pub when: String,
    /// The message kind.
    pub message: &'static str,
    /// Its size as a frame on the wire.
    pub bytes: usize,
    /// What it holds.
    pub holds: String,
}

/// Every kind of message this site would send, as frames encoded from its own configuration and cohort.
pub fn releases(config: &ClientConfig, cohort: &SiteCohort) -> Result<Vec<Release>, NodeError> {
    let limits = Limits::default();
    let size = |m: &Message| -> Result<usize, NodeError> { Ok(codec::encode(m, &limits)?.len()) };
    let counts = cohort.counts();
    let hello = Message::Hello(fedslm_client::hello(config, counts));
    let mut out = vec![Release {
        when: "once per connection".into(),
        message: "Hello",
        bytes: size(&hello)?,
        holds: format!(
            "protocol and software versions, centre id, settings hash, counts: {} patients, {} with SLM, {} with images",
            counts.patients, counts.positives, counts.with_images
        ),
    }];
    let result = |weights: Weights| {
        Message::FitResult(FitResult {
            round: 1,
            weights,
            examples: counts.patients,
            train_loss: 0.0,
        })
    };
    let p = clinical::names().len();
    out.push(Release {
        when: "each round, clinical model (federated Newton)".into(),
        message: "FitResult",
        bytes: size(&result(newton_weights(&LogisticStats::zeros(p))?))?,
        holds: format!("gradient [{p}], Hessian [{p}x{p}], log-likelihood, patient count"),
    });
    let pre = &config.preprocess;
    for kind in [ModelKind::Mri, ModelKind::Combined] {
        let clinical_features = if kind == ModelKind::Combined {
            p - 1
        } else {
            0
        };
        let cfg = NetConfig::compact(pre.channels(), pre.size, clinical_features);
        let net = Network::new(kind, cfg, 0)?;
        out.push(Release {
            when: format!("each round, {kind} network (default {})", net.describe()),
            message: "FitResult",
            bytes: size(&result(net.to_weights()?))?,
            holds: "weights, patient count, training loss".into(),
        });
    }
    Ok(out)
}
