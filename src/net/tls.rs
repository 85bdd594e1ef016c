//! TLS for QUIC: TLS 1.3 only, aws-lc-rs with the hybrid post-quantum key exchange
//! X25519MLKEM768 preferred, the server's identity, and the client's pinning verifier.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::files::write_private_atomic;
use crate::protocol::{ALPN, Fingerprint};

/// File names of a generated identity, beside the server's config.
pub const CERT_FILE: &str = "server-cert.pem";
pub const KEY_FILE: &str = "server-key.pem";

/// aws-lc-rs with the post-quantum hybrid first; classical groups remain for peers
/// without it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups =
        vec![aws_lc_rs::kx_group::X25519MLKEM768, aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1];
    Arc::new(provider)
}

/// A server's certificate chain and key.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The fingerprint clients pin: of the end-entity certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_certificate(&self.certs[0])
    }

    /// A fresh self-signed identity; `(identity, cert PEM, key PEM)`.
    pub fn generate() -> anyhow::Result<(Identity, String, String)> {
        let certified = rcgen::generate_simple_self_signed(vec!["voipc".to_owned(), "localhost".to_owned()])
            .context("generating a self-signed certificate")?;
        let cert_pem = certified.cert.pem();
        let key_pem = certified.signing_key.serialize_pem();
        let identity = Identity {
            certs: vec![certified.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der())),
        };
        Ok((identity, cert_pem, key_pem))
    }

    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
        let certs = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing certificate {}", cert.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key =
            PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading private key {}", key.display()))?;
        Ok(Identity { certs, key })
    }

    /// The identity stored in `dir`, generated and stored there (mode 0600) on first use.
    /// The key is written first and the certificate last, each atomically: a certificate
    /// on disk means both are complete. A key without a certificate is what a crash during
    /// the first start leaves; no client can have pinned a certificate never written, so
    /// a new pair replaces it.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<(Identity, Option<PathBuf>)> {
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert.exists() {
            return Ok((Identity::load(&cert, &key)?, None));
        }
        let (identity, cert_pem, key_pem) = Identity::generate()?;
        write_private_atomic(&key, key_pem.as_bytes()).with_context(|| format!("writing {}", key.display()))?;
        write_private_atomic(&cert, cert_pem.as_bytes()).with_context(|| format!("writing {}", cert.display()))?;
        Ok((identity, Some(cert)))
    }
}

/// The rustls side of a server: TLS 1.3, our ALPN.
pub fn server_tls(identity: Identity) -> anyhow::Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)
        .context("certificate and key do not form a usable identity")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The rustls side of a client whose server certificate is checked by `verifier`.
pub fn client_tls(verifier: Arc<PinningVerifier>) -> anyhow::Result<rustls::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Which server certificate a client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinPolicy {
    /// Exactly this one.
    Pinned(Fingerprint),
    /// Whichever the server presents (the caller pins it afterwards).
    TrustOnFirstUse,
    /// None: connect only to learn the fingerprint for an error message.
    RefuseUnknown,
}

/// Accepts a server certificate by its SHA-256 fingerprint, not by a CA: self-hosted
/// servers have no CA, and a pin is stronger than one. Handshake signatures are still
/// verified, so the server must hold the pinned certificate's key.
#[derive(Debug)]
pub struct PinningVerifier {
    policy: PinPolicy,
    seen: Mutex<Option<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinningVerifier {
    pub fn new(policy: PinPolicy) -> Arc<Self> {
        Arc::new(PinningVerifier { policy, seen: Mutex::new(None), provider: crypto_provider() })
    }

    /// The fingerprint the server presented, once it did.
    pub fn seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().expect("verifier lock is never poisoned: nothing panics under it")
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity);
        *self.seen.lock().expect("verifier lock is never poisoned: nothing panics under it") = Some(fingerprint);
        match self.policy {
            PinPolicy::Pinned(expected) if expected == fingerprint => Ok(ServerCertVerified::assertion()),
            PinPolicy::TrustOnFirstUse => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    /// Runs a TLS handshake in memory between our two configs.
    fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Result<ClientConnection, rustls::Error> {
        let mut server = ServerConnection::new(Arc::new(server))?;
        let mut client = ClientConnection::new(Arc::new(client), ServerName::try_from("voipc").unwrap())?;
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn pinned_handshake_uses_tls13_and_the_post_quantum_hybrid() {
        let (identity, _, _) = Identity::generate().unwrap();
        let fp = identity.fingerprint();
        let client =
            handshake(server_tls(identity).unwrap(), client_tls(PinningVerifier::new(PinPolicy::Pinned(fp))).unwrap())
                .unwrap();
        assert_eq!(client.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(client.negotiated_key_exchange_group().map(|g| g.name()), Some(rustls::NamedGroup::X25519MLKEM768));
        assert_eq!(client.alpn_protocol(), Some(ALPN));
    }

    #[test]
    fn another_certificate_is_refused_and_reported() {
        let (identity, _, _) = Identity::generate().unwrap();
        let actual = identity.fingerprint();
        let verifier = PinningVerifier::new(PinPolicy::Pinned(Fingerprint([9; 32])));
        let result = handshake(server_tls(identity).unwrap(), client_tls(verifier.clone()).unwrap());
        assert!(matches!(result, Err(rustls::Error::InvalidCertificate(_))));
        assert_eq!(verifier.seen(), Some(actual));
    }

    #[test]
    fn identity_is_created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created.is_some());
        let (again, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created.is_none());
        assert_eq!(first.fingerprint(), again.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_first_start_cut_short_after_the_key_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        // The key is written first; a crash before the certificate leaves only the key.
        std::fs::write(dir.path().join(KEY_FILE), "-----BEGIN PRIVATE KEY-----\ncut sh").unwrap();
        let (first, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created.is_some(), "a new pair");
        let (again, _) = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        // A certificate without its key is the operator's to mend: refused, not replaced.
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
    }
}
