//! The servers' and nodes' configurations of a simulation, built as typed values (the same types
//! server.toml and client.toml are read into), never as TOML text.

use std::net::SocketAddr;
use std::path::Path;

use fedslm_certs::{ClientTlsFiles, IssueOptions, Pki};
use fedslm_client::ClientConfig;
use fedslm_protocol::{CenterId, Role};
use fedslm_server::config::{CenterEntry, ServerToml};
use fedslm_server::ServerConfig;

use crate::StudyError;

/// A server on a free loopback port with the simulation's PKI, enrolling every centre with its role, writing
/// its run to `output`; `adjust` sets the run's own keys. Errors name `output/server.toml`, which is never
/// written.
pub fn server_config(
    pki: &Path,
    run_id: &str,
    output: &Path,
    centers: &[(String, Role)],
    adjust: impl FnOnce(&mut ServerToml),
) -> Result<ServerConfig, StudyError> {
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut toml = ServerToml::new(listen, pki.to_path_buf(), run_id.to_string());
    toml.output = output.to_path_buf();
    toml.center = centers
        .iter()
        .map(|(id, role)| CenterEntry {
            id: id.clone(),
            role: role.name().to_string(),
        })
        .collect();
    adjust(&mut toml);
    Ok(ServerConfig::from_toml(toml, &output.join("server.toml"))?)
}

/// A fresh PKI in `pki` for a server on loopback (its certificate names localhost and 127.0.0.1), and a
/// certificate valid `days` for each centre of `names`, in `pki`/centres/`name`, where [`client_config`]
/// looks for it.
pub fn loopback_pki<'a>(
    pki: &Path,
    federation: &str,
    names: impl IntoIterator<Item = &'a str>,
    days: u32,
) -> Result<(), StudyError> {
    let authority = Pki::init(
        pki,
        federation,
        "localhost",
        &[std::net::IpAddr::from([127, 0, 0, 1])],
    )?;
    for name in names {
        let id = CenterId::new(name)
            .map_err(|e| StudyError::Refused(format!("centre folder {name:?}: {e}")))?;
        authority.issue(
            &id,
            &pki.join("centres").join(name),
            IssueOptions::days(days)?,
        )?;
    }
    Ok(())
}

/// A node of centre `name` with its certificate from the simulation's PKI, the study's coding and
/// preprocessing, the shared preprocessing cache, and (for loading) its cohort folder.
pub fn client_config(
    out: &Path,
    pki: &Path,
    name: &str,
    cohort: Option<&Path>,
    server: SocketAddr,
) -> Result<ClientConfig, StudyError> {
    let dir = pki.join("centres").join(name);
    let center = CenterId::new(name)
        .map_err(|e| StudyError::Refused(format!("centre folder {name:?}: {e}")))?;
    Ok(ClientConfig {
        center,
        server: server.to_string(),
        route: fedslm_client::Route::direct(
            fedslm_client::TransportChoice::Quic,
            server.to_string(),
        ),
        server_name: "localhost".into(),
        tls: ClientTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        },
        coding: Default::default(),
        preprocess: Default::default(),
        cohort: cohort.map(Path::to_path_buf),
        cache: Some(out.join("cache")),
        threads: None,
        record: None,
        scores: None,
        privacy: Default::default(),
        ledger: None,
        augmentation: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_quotes_and_spaces_reach_the_configurations_as_they_are() {
        let odd = Path::new("/tmp/a \"quoted\" folder\\with backslash");
        let centers = vec![
            ("center-a".to_string(), Role::Train),
            ("external".to_string(), Role::Validate),
        ];
        let config = server_config(
            &odd.join("pki"),
            "run-1",
            &odd.join("runs"),
            &centers,
            |t| {
                t.rounds = 3;
                t.cv_fold = Some(1);
                t.cv_folds = Some(5);
            },
        )
        .unwrap();
        assert_eq!(config.run.output, odd.join("runs"));
        assert_eq!(config.tls.ca, odd.join("pki/ca.pem"));
        assert_eq!(config.enrolment.rounds, 3);
        assert_eq!(config.run.fold.map(|f| (f.index, f.count)), Some((1, 5)));
        assert_eq!(
            config
                .enrolment
                .centers
                .get(&CenterId::new("external").unwrap()),
            Some(&Role::Validate)
        );
        let client = client_config(
            odd,
            &odd.join("pki"),
            "center-a",
            Some(odd),
            "127.0.0.1:9".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            client.tls.key,
            odd.join("pki/centres/center-a/center-a.key")
        );
        assert_eq!(client.cohort.as_deref(), Some(odd));
        assert!(client_config(
            odd,
            odd,
            "not a centre!",
            None,
            "127.0.0.1:9".parse().unwrap()
        )
        .is_err());
    }

    #[test]
    fn a_setting_that_cannot_work_is_refused_by_the_servers_own_checks() {
        let e = server_config(
            Path::new("/p"),
            "r",
            Path::new("/o"),
            &[("c".into(), Role::Train)],
            |t| {
                t.cv_fold = Some(5);
                t.cv_folds = Some(5);
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cv_fold = 5") && e.contains("/o/server.toml"),
            "{e}"
        );
    }
}
