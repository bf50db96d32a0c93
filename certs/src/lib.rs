//! The federation's public-key infrastructure and the mutual-TLS configurations built on it.
//!
//! The coordinating centre owns the federation CA ([`Pki`]); a site makes its own key and CSR ([`request`]) so
//! that its private key never leaves it; the CA signs it with the centre id the coordinating centre decides
//! ([`Pki::sign_csr`]). Centre certificates carry the URI SAN `urn:fedslm:center:<id>`, which
//! [`center_of`] reads back: a centre's identity comes from its certificate, never from a message.
//! Revocation is an X.509 CRL that the server's verifier rereads when it changes.

mod error;
mod identity;
mod pki;
mod quic;
mod sign;
mod tls;

pub use error::CertError;
pub use identity::{center_of, peer_center, serial_of, validity_of, CENTER_URI_PREFIX};
pub use pki::{
    federation_server_name, request, CenterFiles, IssueOptions, IssuedCert, Pki, RequestFiles,
    RevokeTarget, Signed, Usage, Validity, MAX_DAYS,
};
pub use quic::{
    alert_name, connection_center, connection_chain, quic_client_config, quic_server_config,
    server_endpoint_config, tls_alert, udp_socket, SERVER_IDLE_WINDOW, SERVER_READING_WINDOW,
};
pub use sign::{
    center_issued_by, issued_by, server_signer, verify as verify_signature, SignatureError, Signer,
    SIGNATURE_SCHEME,
};
pub use tls::{
    client_config, provider, server_config, server_config_with_verifier, stranger_client_config,
    ClientTlsFiles, ReloadingClientVerifier, ServerTlsFiles,
};
