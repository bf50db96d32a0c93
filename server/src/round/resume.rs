//! A run's machine: new, or going on after its last committed round (a restarted server).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use fedslm_metrics::{NewtonOptions, NewtonSolver, NewtonStep};
use fedslm_protocol::clinical::COEFFICIENTS;
use fedslm_protocol::landmarks::landmarks_of;
use fedslm_protocol::{CenterId, ModelKind, Role, Weights};

use super::fit::{clinical_weights, After};
use super::{Committed, Coordinator, Phase, RoundSettings, SetupError, Strategy};
use crate::aggregate::check_update;

impl Coordinator {
    /// A run over the enrolled `roles`, from the `initial` global model. Under federated Newton the
    /// coefficients start at zero whatever `initial` holds (its shape gives their number), and `names` name
    /// them in the fit.
    pub fn new(
        settings: RoundSettings,
        roles: BTreeMap<CenterId, Role>,
        initial: Weights,
        names: &[&str],
    ) -> Result<Coordinator, SetupError> {
        let training = roles.values().filter(|r| **r == Role::Train).count();
        if training == 0 {
            return Err(SetupError::NoTrainingCenter);
        }
        if settings.quorum == 0 {
            return Err(SetupError::ZeroQuorum);
        }
        if settings.quorum > training {
            return Err(SetupError::Quorum {
                quorum: settings.quorum,
                training,
            });
        }
        if settings.rounds == 0 {
            return Err(SetupError::ZeroRounds);
        }
        if initial.is_empty() {
            return Err(SetupError::EmptyModel);
        }
        let newton = match (settings.model, settings.strategy) {
            (ModelKind::Clinical, Strategy::Newton) => {
                let p = names.len();
                if initial.get(COEFFICIENTS).map(|t| t.shape()) != Some(&[p][..]) {
                    return Err(SetupError::Coefficients(p));
                }
                Some(NewtonSolver::new(names, NewtonOptions::default()))
            }
            (ModelKind::Clinical, other) => {
                return Err(SetupError::ClinicalNeedsNewton(other.name()))
            }
            (kind, Strategy::Newton) => return Err(SetupError::NewtonNeedsClinical(kind)),
            (_, Strategy::Landmarks) => {
                if settings.dp.is_some() {
                    return Err(SetupError::LandmarksUnderDp);
                }
                match landmarks_of(&initial) {
                    Ok(_) if initial.len() == 1 => {}
                    Ok(_) => {
                        return Err(SetupError::Landmarks(format!("{} tensors", initial.len())))
                    }
                    Err(e) => return Err(SetupError::Landmarks(e.to_string())),
                }
                None
            }
            _ => None,
        };
        let global = match &newton {
            Some(solver) => clinical_weights(solver.point(), None),
            None => initial,
        };
        Ok(Coordinator {
            settings,
            roles,
            connected: BTreeMap::new(),
            declared: BTreeMap::new(),
            examples: BTreeMap::new(),
            global: Arc::new(global),
            committed: 0,
            retries: 0,
            phase: Phase::Waiting(None),
            next_task: 1,
            first_task_of_round: 1,
            newton,
            actions: VecDeque::new(),
            evaluation_due: None,
            short_since: None,
        })
    }

    /// A run that goes on after its last committed round (a restarted server). Under federated Newton the
    /// rounds' summed statistics are replayed through a fresh solver so that its state (step halving included)
    /// is the uninterrupted run's, and the replayed point must be the stored model. A run with nothing left to
    /// do finishes at once, as it would have.
    pub fn resume(
        settings: RoundSettings,
        roles: BTreeMap<CenterId, Role>,
        initial: Weights,
        names: &[&str],
        last: Committed,
    ) -> Result<Coordinator, SetupError> {
        let Committed {
            round: committed,
            global,
            newton_history,
            evaluated,
        } = last;
        let mut c = Coordinator::new(settings, roles, initial, names)?;
        if committed == 0 {
            return Ok(c);
        }
        check_update(&c.global, &global, None)
            .map_err(|e| SetupError::Resume(format!("the last checkpoint: {e}")))?;
        let mut converged = None;
        if let Some(solver) = &mut c.newton {
            if newton_history.len() != committed as usize {
                return Err(SetupError::Resume(format!(
                    "{committed} rounds committed but {} carry Newton statistics",
                    newton_history.len()
                )));
            }
            for (i, stats) in newton_history.iter().enumerate() {
                if converged.is_some() {
                    return Err(SetupError::Resume(format!(
                        "federated Newton converged at round {i}, yet rounds were committed after it"
                    )));
                }
                match super::fit::observe(solver, &c.settings, stats.clone(), i as u32 + 1) {
                    Ok(NewtonStep::Evaluate(_)) => {}
                    Ok(NewtonStep::Converged(fit)) => converged = Some(fit),
                    Err(e) => return Err(SetupError::Resume(format!("round {}: {e}", i + 1))),
                }
            }
            let replayed = match &converged {
                Some(fit) => clinical_weights(&fit.coefficients, Some(&fit.covariance)),
                None => clinical_weights(solver.point(), None),
            };
            if replayed != global {
                return Err(SetupError::Resume(
                    "the replayed Newton steps do not give the last checkpoint's coefficients"
                        .into(),
                ));
            }
        }
        c.global = Arc::new(global);
        c.committed = committed;
        c.next_task = 1;
        let after = c.after_commit(converged);
        if !evaluated && c.evaluation_due(&after) {
            // Killed before the last round's evaluation was stored: it comes first, once centres are back.
            c.evaluation_due = Some(after);
        } else if let After::Finish(outcome) = after {
            c.finish(outcome);
        }
        Ok(c)
    }
}
