//! Who may join a run, decided from the certificate's centre id and the Hello alone. Pure: no IO.

use std::collections::BTreeMap;
use std::fmt;

use fedslm_protocol::hex::to_hex;
use fedslm_protocol::{CenterId, ErrorCode, Hello, Role, StatusRequest, Welcome, PROTOCOL_VERSION};

/// The run's membership, from the server's configuration only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    pub run_id: String,
    pub rounds: u32,
    pub centers: BTreeMap<CenterId, Role>,
    /// The clinical coding and preprocessing every centre must use; `None` accepts any.
    pub settings_hash: Option<[u8; 32]>,
    /// Admit only centres whose own policy requires differential privacy (server.toml `privacy.require_dp`).
    pub require_dp: bool,
}

/// Why a verified peer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Version {
        got: u16,
    },
    NotEnrolled {
        center: CenterId,
        run_id: String,
    },
    IdentityMismatch {
        claimed: CenterId,
        certified: CenterId,
    },
    Settings {
        expected: [u8; 32],
        got: [u8; 32],
    },
    PrivacyRequired {
        center: CenterId,
    },
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Version { .. } => ErrorCode::UnsupportedVersion,
            Refusal::NotEnrolled { .. } => ErrorCode::NotEnrolled,
            Refusal::IdentityMismatch { .. } => ErrorCode::IdentityMismatch,
            Refusal::Settings { .. } => ErrorCode::SettingsMismatch,
            Refusal::PrivacyRequired { .. } => ErrorCode::PrivacyRequired,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Version { got } => write!(
                f,
                "protocol version {got} is not supported; this server speaks version {PROTOCOL_VERSION}"
            ),
            Refusal::NotEnrolled { center, run_id } => {
                write!(f, "centre {center} is not enrolled in run {run_id}")
            }
            Refusal::IdentityMismatch { claimed, certified } => write!(
                f,
                "Hello claims centre {claimed}, but the certificate is centre {certified}'s"
            ),
            Refusal::Settings { expected, got } => write!(
                f,
                "clinical coding and preprocessing settings differ from the run's: hash {} here, {} expected",
                to_hex(got),
                to_hex(expected)
            ),
            Refusal::PrivacyRequired { center } => write!(
                f,
                "this run requires differential privacy of every release (server.toml privacy.require_dp), and \
                 centre {center}'s policy does not require it (client.toml privacy.require_dp)"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Admits `certified` (the centre of the verified certificate) on its `hello`, or says why not.
pub fn admit(
    enrolment: &Enrolment,
    certified: &CenterId,
    hello: &Hello,
) -> Result<Welcome, Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::Version {
            got: hello.protocol_version,
        });
    }
    let role = *enrolment
        .centers
        .get(certified)
        .ok_or_else(|| Refusal::NotEnrolled {
            center: certified.clone(),
            run_id: enrolment.run_id.clone(),
        })?;
    if &hello.center != certified {
        return Err(Refusal::IdentityMismatch {
            claimed: hello.center.clone(),
            certified: certified.clone(),
        });
    }
    if enrolment.require_dp && !hello.requires_dp {
        return Err(Refusal::PrivacyRequired {
            center: certified.clone(),
        });
    }
    if let Some(expected) = enrolment.settings_hash {
        if expected != hello.settings_hash {
            return Err(Refusal::Settings {
                expected,
                got: hello.settings_hash,
            });
        }
    }
    Ok(Welcome {
        run_id: enrolment.run_id.clone(),
        center: certified.clone(),
        role,
        rounds: enrolment.rounds,
    })
}

/// Whether `certified` may be told the run's status on its `request`: the same version, identity and
/// enrolment rules as a Hello (the settings do not matter: nothing is trained).
pub fn admit_status(
    enrolment: &Enrolment,
    certified: &CenterId,
    request: &StatusRequest,
) -> Result<(), Refusal> {
    if request.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::Version {
            got: request.protocol_version,
        });
    }
    if !enrolment.centers.contains_key(certified) {
        return Err(Refusal::NotEnrolled {
            center: certified.clone(),
            run_id: enrolment.run_id.clone(),
        });
    }
    if &request.center != certified {
        return Err(Refusal::IdentityMismatch {
            claimed: request.center.clone(),
            certified: certified.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedslm_protocol::SampleCounts;

    fn id(s: &str) -> CenterId {
        CenterId::new(s).unwrap()
    }

    fn enrolment() -> Enrolment {
        Enrolment {
            run_id: "run-1".into(),
            rounds: 5,
            centers: [
                (id("center-a"), Role::Train),
                (id("external"), Role::Validate),
            ]
            .into(),
            settings_hash: Some([7; 32]),
            require_dp: false,
        }
    }

    fn hello(center: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: "test".into(),
            center: id(center),
            settings_hash: [7; 32],
            policy_hash: [0; 32],
            requires_dp: false,
            counts: SampleCounts::default(),
        }
    }

    #[test]
    fn enrolled_centers_get_their_configured_role() {
        let w = admit(&enrolment(), &id("external"), &hello("external")).unwrap();
        assert_eq!(
            (w.role, w.rounds, w.run_id.as_str()),
            (Role::Validate, 5, "run-1")
        );
        let w = admit(&enrolment(), &id("center-a"), &hello("center-a")).unwrap();
        assert_eq!(w.role, Role::Train);
    }

    #[test]
    fn each_refusal() {
        let e = enrolment();
        let r = admit(&e, &id("center-z"), &hello("center-z")).unwrap_err();
        assert_eq!(
            r.to_string(),
            "centre center-z is not enrolled in run run-1"
        );
        assert_eq!(r.code(), ErrorCode::NotEnrolled);

        let r = admit(&e, &id("center-a"), &hello("external")).unwrap_err();
        assert_eq!(
            r.to_string(),
            "Hello claims centre external, but the certificate is centre center-a's"
        );

        let mut h = hello("center-a");
        h.protocol_version = 9;
        assert_eq!(
            admit(&e, &id("center-a"), &h).unwrap_err(),
            Refusal::Version { got: 9 }
        );

        let mut h = hello("center-a");
        h.settings_hash = [8; 32];
        let r = admit(&e, &id("center-a"), &h).unwrap_err();
        assert_eq!(r.code(), ErrorCode::SettingsMismatch);
        assert!(r.to_string().contains(&"08".repeat(32)));

        let any = Enrolment {
            settings_hash: None,
            ..e
        };
        assert!(admit(&any, &id("center-a"), &h).is_ok());
    }

    #[test]
    fn a_run_that_requires_dp_admits_only_centres_whose_policy_requires_it() {
        let e = Enrolment {
            require_dp: true,
            ..enrolment()
        };
        let r = admit(&e, &id("center-a"), &hello("center-a")).unwrap_err();
        assert_eq!(r.code(), ErrorCode::PrivacyRequired);
        assert!(r.to_string().contains("privacy.require_dp"), "{r}");
        let mut h = hello("center-a");
        h.requires_dp = true;
        assert!(admit(&e, &id("center-a"), &h).is_ok());
        assert!(admit(&enrolment(), &id("center-a"), &hello("center-a")).is_ok());
    }

    #[test]
    fn a_status_request_is_held_to_the_same_rules_as_a_hello() {
        let e = enrolment();
        let ask = |center: &str, version| StatusRequest {
            protocol_version: version,
            center: id(center),
        };
        assert!(admit_status(&e, &id("center-a"), &ask("center-a", PROTOCOL_VERSION)).is_ok());
        assert_eq!(
            admit_status(&e, &id("center-a"), &ask("center-a", 9)),
            Err(Refusal::Version { got: 9 })
        );
        assert_eq!(
            admit_status(&e, &id("center-z"), &ask("center-z", PROTOCOL_VERSION))
                .unwrap_err()
                .code(),
            ErrorCode::NotEnrolled
        );
        assert_eq!(
            admit_status(&e, &id("center-a"), &ask("external", PROTOCOL_VERSION))
                .unwrap_err()
                .code(),
            ErrorCode::IdentityMismatch
        );
    }
}
