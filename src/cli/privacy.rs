//! `fedslm privacy`: a site's differential-privacy budget, what its ledger says it has spent run by run and
//! over its lifetime, and what is left.

use std::path::PathBuf;

use clap::Args;
use fedslm_client::ClientConfig;
use fedslm_node::ledger::Ledger;

#[derive(Debug, Args)]
pub struct PrivacyArgs {
    /// Client configuration (TOML) whose `[privacy]` table names the budget and the ledger.
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: PrivacyArgs) -> anyhow::Result<()> {
    let config = ClientConfig::load(&args.config)?;
    println!("policy: {}", config.privacy);
    let Some(path) = &config.ledger else {
        println!("no ledger (privacy.ledger): this site records no spending");
        return Ok(());
    };
    if !path.exists() {
        println!("ledger {}: none yet, nothing spent", path.display());
        return Ok(());
    }
    let ledger = Ledger::read(path)?;
    let budget = config.privacy.dp_budget;
    let s = ledger.spending(budget.as_ref())?;
    println!(
        "ledger {}: {} releases, ε at δ = {:e}",
        path.display(),
        ledger.entries().len(),
        s.delta
    );
    println!(
        "{:<40} {:>9} {:>10} {:>10}",
        "run", "releases", "ε spent", "ε left"
    );
    for r in &s.runs {
        println!(
            "{:<40} {:>9} {:>10.4} {:>10}",
            fedslm_protocol::text::escape_peer(&r.run),
            r.releases,
            r.epsilon,
            r.remaining.map_or("-".to_string(), |e| format!("{e:.4}"))
        );
    }
    println!(
        "{:<40} {:>9} {:>10.4} {:>10}",
        "all runs",
        ledger.entries().len(),
        s.lifetime_epsilon,
        s.lifetime_remaining
            .map_or("-".to_string(), |e| format!("{e:.4}"))
    );
    Ok(())
}
